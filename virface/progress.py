"""Progress within a run: speed, loss and time left, as a line a person can read.

The stage loop builds a :class:`StepProgress` every ``log_every`` steps (one host sync each) and
an :class:`EvalProgress` after each pair set it scores; ``virface-train`` prints them, a search trial hands it to the search driver, which prints it with
the trial's place in the stage (``trial 2/4``) and the stage's time left.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from virface.fileio import write_text_atomic

PROGRESS_FILE = "progress.json"
EVAL_PROGRESS_FILE = "eval_progress.json"


def format_duration(seconds: float | None) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05``; None -> ``?``."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class StepProgress:
    """Where a run stands after ``step`` of ``steps`` steps of epoch ``epoch``."""

    stage: str
    epoch: int
    max_epoch: int
    step: int
    steps: int
    loss: float
    samples_per_s: float
    epoch_left_s: float
    run_left_s: float

    @property
    def fraction_done(self) -> float:
        """Of the whole run, in [0, 1]."""
        done = (self.epoch - 1) + self.step / max(self.steps, 1)
        return min(1.0, done / max(self.max_epoch, 1))

    def line(self) -> str:
        return (f"{self.stage} epoch {self.epoch}/{self.max_epoch} step {self.step}/{self.steps} | "
                f"loss {self.loss:.4g} | {self.samples_per_s:,.0f} img/s | "
                f"epoch {format_duration(self.epoch_left_s)} left | "
                f"run {format_duration(self.run_left_s)} left")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalProgress:
    """Pair set ``index`` of ``count`` scored after epoch ``epoch``: its size, its speed and the
    time the epoch's evaluation has left (the remaining pairs at the speed so far)."""

    stage: str
    epoch: int
    max_epoch: int
    name: str
    index: int
    count: int
    pairs: int
    seconds: float
    left_s: float

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / max(self.seconds, 1e-9)

    def line(self) -> str:
        return (f"{self.stage} epoch {self.epoch}/{self.max_epoch} evaluated {self.name} "
                f"({self.index}/{self.count}): {self.pairs:,} pairs in {self.seconds:.1f} s, "
                f"{self.pairs_per_s:,.0f} pairs/s | evaluation {format_duration(self.left_s)} left")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class EvalClock:
    """Times an epoch's evaluation one pair set at a time (``sizes``: name -> pairs, in the
    order they are scored)."""

    def __init__(self, stage: str, epoch: int, max_epoch: int, sizes: dict[str, int]):
        self.stage, self.epoch, self.max_epoch = stage, epoch, max_epoch
        self.sizes = dict(sizes)
        self.done_pairs, self.done_s, self.done = 0, 0.0, 0

    def record(self, name: str, seconds: float) -> EvalProgress:
        pairs = self.sizes[name]
        self.done += 1
        self.done_pairs += pairs
        self.done_s += seconds
        left_pairs = sum(self.sizes.values()) - self.done_pairs
        left_s = left_pairs * self.done_s / max(self.done_pairs, 1)
        return EvalProgress(self.stage, self.epoch, self.max_epoch, name, self.done, len(self.sizes),
                            pairs, seconds, left_s)


class RunClock:
    """Estimates time left from the steps timed so far in this epoch and the evaluation time of
    the previous epoch (evaluation runs between epochs and is not a step)."""

    def __init__(self, stage: str, max_epoch: int):
        self.stage, self.max_epoch = stage, max_epoch
        self.eval_s = 0.0

    def progress(self, epoch: int, step: int, steps: int, elapsed_s: float, loss: float,
                 samples: int) -> StepProgress:
        per_step = elapsed_s / max(step, 1)
        epoch_left = per_step * (steps - step)
        later_epochs = (self.max_epoch - epoch) * (per_step * steps + self.eval_s)
        return StepProgress(self.stage, epoch, self.max_epoch, step, steps, loss,
                            samples / max(elapsed_s, 1e-9), epoch_left,
                            epoch_left + self.eval_s + later_epochs)


def write_progress(folder: str, progress: StepProgress | EvalProgress) -> None:
    """Replace ``folder/progress.json`` with a StepProgress, or add an EvalProgress to
    ``folder/eval_progress.json`` (the pair sets scored so far in the latest evaluated epoch, so
    a reader that looks less often than sets are scored still sees each); atomically: a reader
    never sees half a file."""
    if isinstance(progress, EvalProgress):
        scored = [p for p in read_eval_progress(folder) if p.epoch == progress.epoch]
        text = json.dumps([p.to_dict() for p in scored + [progress]])
        write_text_atomic(os.path.join(folder, EVAL_PROGRESS_FILE), text)
    else:
        write_text_atomic(os.path.join(folder, PROGRESS_FILE), json.dumps(progress.to_dict()))


def read_eval_progress(folder: str) -> list[EvalProgress]:
    """The pair sets scored so far in a run's latest evaluated epoch, in order; [] if none."""
    try:
        with open(os.path.join(folder, EVAL_PROGRESS_FILE), encoding="utf-8") as f:
            return [EvalProgress(**item) for item in json.load(f)]
    except (OSError, ValueError, TypeError):
        return []


def read_progress(folder: str) -> StepProgress | None:
    """The last progress a run wrote into ``folder``, or None."""
    try:
        with open(os.path.join(folder, PROGRESS_FILE), encoding="utf-8") as f:
            return StepProgress(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
