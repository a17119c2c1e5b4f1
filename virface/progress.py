"""Progress within a run: speed, loss and time left, as a line a person can read.

The stage loop builds a :class:`StepProgress` every ``log_every`` steps (one host sync each);
``virface-train`` prints it, a search trial hands it to the search driver, which prints it with
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


def write_progress(folder: str, progress: StepProgress) -> None:
    """Replace ``folder/progress.json`` (atomically: a reader never sees half a file)."""
    write_text_atomic(os.path.join(folder, PROGRESS_FILE), json.dumps(progress.to_dict()))


def read_progress(folder: str) -> StepProgress | None:
    """The last progress a run wrote into ``folder``, or None."""
    try:
        with open(os.path.join(folder, PROGRESS_FILE), encoding="utf-8") as f:
            return StepProgress(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
