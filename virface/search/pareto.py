"""Accuracy against cost: the Pareto front of a stage searched on several objectives, and the
rule that picks the checkpoint passed on from it.

Each trial is one point: its values at its best validation epoch (the epoch the stage's
selection metric is best at; cost metrics are the same at every epoch). A point is on the front
when no other point is at least as good on every objective and better on one. The user's rule
(``select:`` in the search space) then picks one front point::

    select: {maximize: synth_cfp_fp_acc, where: {latency_ms: {max: 5}}}

reads "the most accurate trial whose batch-1 latency is at most 5 ms". Plain functions of
numbers: no Ray, no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from virface.errors import VirFaceError


class NoTrialSelected(VirFaceError):
    """No trial on the Pareto front satisfies the select rule's bounds."""


@dataclass(frozen=True)
class Objective:
    name: str
    mode: str                     # "max" | "min"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b


@dataclass(frozen=True)
class SelectRule:
    """Best ``metric`` (in ``mode``) among the points inside every bound; ``bounds`` maps a
    metric to ``(min, max)``, either end None (open)."""

    metric: str
    mode: str
    bounds: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    def admits(self, values: dict[str, float]) -> bool:
        for name, (low, high) in self.bounds.items():
            value = values.get(name)
            if value is None or (low is not None and value < low) or (high is not None and value > high):
                return False
        return True

    def describe(self) -> str:
        text = f"{'maximize' if self.mode == 'max' else 'minimize'} {self.metric}"
        limits = []
        for name, (low, high) in self.bounds.items():
            if low is not None:
                limits.append(f"{name} >= {low:g}")
            if high is not None:
                limits.append(f"{name} <= {high:g}")
        return text + (f" where {' and '.join(limits)}" if limits else "")

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode,
                "where": {k: {"min": lo, "max": hi} for k, (lo, hi) in self.bounds.items()}}


@dataclass
class TrialPoint:
    """One trial's objective values at its best validation epoch."""

    trial_id: str
    values: dict[str, float]
    checkpoint: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "values": dict(self.values), "checkpoint": self.checkpoint,
                "params": dict(self.params)}


def _complete(point: TrialPoint, objectives: list[Objective]) -> bool:
    return all(isinstance(point.values.get(o.name), (int, float)) and math.isfinite(point.values[o.name])
               for o in objectives)


def dominates(a: dict[str, float], b: dict[str, float], objectives: list[Objective]) -> bool:
    """Whether ``a`` is at least as good as ``b`` on every objective and better on one."""
    if any(o.better(b[o.name], a[o.name]) for o in objectives):
        return False
    return any(o.better(a[o.name], b[o.name]) for o in objectives)


def pareto_front(points: list[TrialPoint], objectives: list[Objective]) -> list[TrialPoint]:
    """The non-dominated points, in the order given. A point missing an objective's value (or
    with a NaN) is on no front. Points with equal values dominate each other in neither
    direction, so both stay."""
    usable = [p for p in points if _complete(p, objectives)]
    return [p for p in usable if not any(dominates(q.values, p.values, objectives) for q in usable if q is not p)]


def rank_trials(points: list[TrialPoint], metric: str, mode: str,
                completed: set[str] | None = None) -> list[TrialPoint]:
    """The points best first by ``metric``: highest first for mode "max", lowest first for
    "min". Equal values keep the order given (the order the trials finished in). ``ranked[0]``
    is the trial a stage chooses and passes on.

    ``completed``: the ids of the trials that trained every epoch; they rank before the others.
    A trial the scheduler stopped early is valued on fewer epochs, and was stopped for looking
    worse: otherwise a one-epoch trial that barely moved from its starting checkpoint can win
    against trials that changed it for longer, and be retrained (--compare) at a length it was
    never validated at."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(points, key=lambda p: (completed is not None and p.trial_id not in completed,
                                         sign * p.values[metric]))


def carried_trials(ranked: list[TrialPoint], carry_top: int) -> list[TrialPoint]:
    """The trials ``--carry_top K`` passes on to the next stage: the K first of ``ranked`` (all
    of them when fewer qualify), best first; none for K = 1, the plain chain, which passes on
    ``ranked[0]`` alone."""
    return list(ranked[:carry_top]) if carry_top > 1 else []


def rank_by_rule(points: list[TrialPoint], rule: SelectRule) -> list[TrialPoint]:
    """The points inside the rule's bounds, best first by its metric (ties keep their order)."""
    admitted = [p for p in points if rule.admits(p.values) and isinstance(p.values.get(rule.metric), (int, float))]
    return rank_trials(admitted, rule.metric, rule.mode)


def select_point(front: list[TrialPoint], rule: SelectRule) -> TrialPoint:
    """The front point the rule picks; NoTrialSelected (listing the front) when none fits."""
    ranked = rank_by_rule(front, rule)
    if not ranked:
        listed = "; ".join(f"{p.trial_id}: " + ", ".join(f"{k}={v:.4g}" for k, v in p.values.items())
                           for p in front)
        raise NoTrialSelected(f"select: no trial on the Pareto front satisfies "
                              f"'{rule.describe()}' (front: {listed or 'empty'}); loosen the bounds")
    return ranked[0]


def format_front(objectives: list[Objective], front: list[TrialPoint], chosen_id: str | None,
                 rule: SelectRule | None) -> str:
    """The front as a text table, best first by the first objective; ``*`` marks the chosen."""
    names = [o.name for o in objectives]
    params = sorted({k for p in front for k in p.params})
    header = f"  {'trial':<16}" + "".join(f" {n:>18}" for n in names) + "  params"
    lines = [f"Pareto front on {', '.join(f'{o.name} ({o.mode})' for o in objectives)}: "
             f"{len(front)} trial(s)" + (f"; select: {rule.describe()}" if rule else ""), header]
    first = objectives[0]
    for p in sorted(front, key=lambda p: p.values[first.name], reverse=first.mode == "max"):
        mark = "*" if p.trial_id == chosen_id else " "
        values = "".join(f" {_number(p.values[n]):>18}" for n in names)
        lines.append(f"{mark} {p.trial_id:<16}{values}  "
                     + ", ".join(f"{k}={_number(p.params[k])}" for k in params if k in p.params))
    return "\n".join(lines)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def plot_front(objectives: list[Objective], points: list[TrialPoint], front: list[TrialPoint],
               chosen_id: str | None, path: str, label: str | None = "arch") -> str:
    """The first objective against each other one: every trial (grey), the front (blue, joined),
    the chosen trial (red ring); points are labelled with their ``label`` parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, others = objectives[0], objectives[1:]
    fig, axes = plt.subplots(1, len(others), figsize=(5.2 * len(others), 4.0), squeeze=False)
    usable = [p for p in points if _complete(p, objectives)]
    for ax, x in zip(axes[0], others):
        ax.scatter([p.values[x.name] for p in usable], [p.values[y.name] for p in usable],
                   color="lightgrey", edgecolor="grey", label="trial", zorder=2)
        # The front as seen in this plane: its points joined in x order.
        on_front = sorted(front, key=lambda p: p.values[x.name])
        # Higher y at higher x (accuracy against a cost): the staircase bounding what it dominates.
        steps = "steps-post" if (y.mode == "max") == (x.mode == "min") else "default"
        ax.plot([p.values[x.name] for p in on_front], [p.values[y.name] for p in on_front],
                "o-", color="tab:blue", label="Pareto front", zorder=3, drawstyle=steps)
        for p in usable:
            if label and label in p.params:
                ax.annotate(str(p.params[label]), (p.values[x.name], p.values[y.name]), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
            if p.trial_id == chosen_id:
                ax.scatter([p.values[x.name]], [p.values[y.name]], s=160, facecolor="none",
                           edgecolor="tab:red", linewidth=2, label="selected", zorder=4)
        if x.name in ("params", "macs") and min(p.values[x.name] for p in usable) > 0:
            ax.set_xscale("log")
        ax.set_xlabel(f"{x.name} ({'lower' if x.mode == 'min' else 'higher'} is better)")
        ax.set_ylabel(f"{y.name} ({'higher' if y.mode == 'max' else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
