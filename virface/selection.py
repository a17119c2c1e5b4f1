"""How a run's value is taken from its epochs: the selection rule.

One rule, written the same way everywhere (``virface-train --selection``, a search space's
``selection:`` key, the benchmarks' ``--rule``):

- ``best``: the best epoch's value of the selection metric (the epoch with the highest, or for a
  loss the lowest, value; the earliest on a tie). best.pt is that epoch.
- ``last``: the last epoch's value. best.pt is the last epoch.
- ``mean_last:K``: the mean of the last K epochs' values (of all of them while fewer than K have
  run). best.pt is the last epoch; the run's value is that mean. Picking the best of many noisy
  epochs chases measurement noise; the mean of the last few averages part of it away.

A stage reports the rule's value so far every epoch as ``best_<metric>``, which is what the search
(ASHA, TPE, the best-trial ranking, the manifest) reads. Plain Python, no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from virface.errors import ConfigError

RULE_KINDS = ("best", "last", "mean_last")
RULE_SPELLINGS = "best, last or mean_last:K (K a whole number >= 1, e.g. mean_last:3)"
DEFAULT_RULE = "best"


@dataclass(frozen=True)
class SelectionRule:
    """A parsed rule: ``kind`` one of RULE_KINDS, ``k`` the window of ``mean_last`` (else 1)."""

    kind: str
    k: int = 1

    @classmethod
    def parse(cls, text: Any, key: str = "selection") -> "SelectionRule":
        """``best``, ``last`` or ``mean_last:K``; a ConfigError naming ``key`` otherwise."""
        if not isinstance(text, str):
            raise ConfigError(f"{key}: {text!r} must be {RULE_SPELLINGS}")
        kind, sep, window = text.strip().partition(":")
        if kind in ("best", "last") and not sep:
            return cls(kind)
        if kind == "mean_last" and sep and window.isdigit() and int(window) >= 1:
            return cls(kind, int(window))
        raise ConfigError(f"{key}: {text!r} is not {RULE_SPELLINGS}")

    @property
    def text(self) -> str:
        return f"mean_last:{self.k}" if self.kind == "mean_last" else self.kind

    def describe(self, metric: str = "the selection metric") -> str:
        """The rule in words (what summaries record as ``"rule"``)."""
        if self.kind == "best":
            return f"the epoch with the best {metric} (best.pt: that epoch)"
        if self.kind == "last":
            return f"{metric} of the last epoch (best.pt: the last epoch)"
        return f"mean {metric} over the last {self.k} epochs (best.pt: the last epoch)"

    def value(self, values: Sequence[float], mode: str = "max") -> float:
        """The run's value from its per-epoch ``values`` (in epoch order, at least one)."""
        return self.value_and_epoch(values, mode)[0]

    def epoch(self, values: Sequence[float], mode: str = "max") -> int:
        """The 1-based epoch best.pt holds under this rule."""
        return self.value_and_epoch(values, mode)[1]

    def value_and_epoch(self, values: Sequence[float], mode: str = "max") -> tuple[float, int]:
        if mode not in ("max", "min"):
            raise ConfigError(f"mode: {mode!r} is not one of ['max', 'min']")
        values = [float(v) for v in values]
        if not values:
            raise ValueError("a selection rule needs at least one epoch's value")
        if self.kind == "best":
            sign = 1.0 if mode == "max" else -1.0
            # NaN never wins; the earliest epoch wins a tie.
            index = max(range(len(values)),
                        key=lambda i: (not math.isnan(values[i]), sign * values[i] if not math.isnan(values[i])
                                       else -math.inf, -i))
            return values[index], index + 1
        if self.kind == "last":
            return values[-1], len(values)
        window = values[-self.k:]
        return sum(window) / len(window), len(values)


def parse_rule(text: Any, key: str = "selection") -> SelectionRule:
    return SelectionRule.parse(text, key)


class RuleTracker:
    """The rule applied epoch by epoch, as a stage runs: ``update(value)`` after each epoch says
    whether that epoch becomes best.pt and gives the rule's value so far.

    ``state()`` / ``from_state()`` carry what a resumed run needs (the best value and epoch, and
    the last K values of ``mean_last``) in the checkpoint's ``best`` entry.
    """

    def __init__(self, rule: SelectionRule, metric: str, mode: str):
        self.rule, self.metric, self.mode = rule, metric, mode
        self.best: dict[str, Any] = {}
        self.recent: list[float] = []

    def update(self, value: float, epoch: int) -> tuple[bool, float]:
        """``(this epoch is now best.pt, the rule's value so far)``."""
        value = float(value)
        self.recent = (self.recent + [value])[-max(self.rule.k, 1):]
        if self.rule.kind == "best":
            old = self.best.get("value")
            better = (old is None or (not math.isnan(value) and (
                math.isnan(old) or (value > old if self.mode == "max" else value < old))))
            if better:
                self.best = self._entry(value, epoch)
            return better, self.best["value"]
        self.best = self._entry(self.rule.value(self.recent, self.mode), epoch)
        return True, self.best["value"]

    def _entry(self, value: float, epoch: int) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "value": value, "epoch": epoch,
                "rule": self.rule.text}

    def state(self) -> dict[str, Any]:
        if not self.best or self.rule.kind == "best":      # the best value is all "best" needs
            return dict(self.best)
        return {**self.best, "recent": list(self.recent)}

    @classmethod
    def from_state(cls, rule: SelectionRule, metric: str, mode: str,
                   state: dict[str, Any] | None) -> "RuleTracker":
        tracker = cls(rule, metric, mode)
        state = dict(state or {})
        if state.get("rule", DEFAULT_RULE) != rule.text and state:
            raise ConfigError(f"selection: the resumed run used {state.get('rule', DEFAULT_RULE)!r}, not "
                              f"{rule.text!r}; a resume may not change the selection rule")
        tracker.recent = [float(v) for v in state.pop("recent", [])]
        tracker.best = state
        return tracker
