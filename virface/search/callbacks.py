"""The search driver's view of its trials: progress lines a person can read, and each trial's
TensorBoard HParams entry once its outcome is known.

Lines (on stdout, the driver's; also what ``ray job logs`` shows):
  [pretrain] trial 2/4 8f3a2b1c started: lr=0.05, m=0.4
  [pretrain] trial 2/4 8f3a2b1c | epoch 3/6 step 20/40 | loss 10.9 | 612 img/s | trial 0:35 left | stage <= 2:10 left
  [pretrain] trial 2/4 8f3a2b1c | epoch 3/6 evaluated cfp_fp (1/3): 7,000 pairs, 410 pairs/s | evaluation 0:31 left
  [pretrain] trial 2/4 8f3a2b1c | epoch 3/6: cfp_fp_acc=0.8823 (best 0.8823) loss=10.9
  [pretrain] trial 2/4 8f3a2b1c stopped early at epoch 2/6 (best cfp_fp_acc=0.8711)

Step lines come from the ``progress.json`` (evaluation lines: ``eval_progress.json``) each trial's rank 0 rewrites in its TensorBoard run
folder every ``log_every`` steps (storage is shared by every node of a cluster); the driver looks
at most once a second. "stage <= ..." is an upper bound: ASHA may stop trials early.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

from ray.tune import Callback

from virface.progress import format_duration, read_eval_progress, read_progress
from virface.search.report import (OUTCOME_COMPLETED, OUTCOME_FAILED, OUTCOME_STOPPED, format_value,
                                   trial_outcome)

POLL_EVERY_S = 1.0


def tensorboard_hparams(stage: str, params: dict[str, Any], outcome: str) -> dict[str, Any]:
    """The HParams values TensorBoard shows for a trial.

    TensorBoard's table prints every number with 5 significant digits (128 -> 128.00), so ints
    are written as text; unset (None) parameters are left out rather than shown as "None".
    """
    values: dict[str, Any] = {"stage": stage, "outcome": outcome}
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        elif not isinstance(value, (bool, float, str)):
            value = str(value)
        values[name] = value
    return values


def write_trial_hparams(tb_dir: str, stage: str, params: dict[str, Any], outcome: str,
                        start_time: float | None = None) -> None:
    """Write the trial's HParams session (start with its values, end with its status) into its
    TensorBoard run. Written once the outcome is known: TensorBoard keeps the first session-start
    record of a run, so it cannot be corrected later."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from torch.utils.tensorboard import SummaryWriter

    start = plugin_data_pb2.SessionStartInfo(start_time_secs=start_time or time.time())
    for name, value in tensorboard_hparams(stage, params, outcome).items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, float):
            start.hparams[name].number_value = value
        else:
            start.hparams[name].string_value = value
    status = api_pb2.STATUS_FAILURE if outcome == OUTCOME_FAILED else api_pb2.STATUS_SUCCESS
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    writer = SummaryWriter(tb_dir)
    try:
        for tag, data in ((metadata.SESSION_START_INFO_TAG, {"session_start_info": start}),
                          (metadata.SESSION_END_INFO_TAG, {"session_end_info": end})):
            content = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**data))
            writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, metadata=content)]))
    finally:
        writer.close()


HPARAMS_CONFIG_SUFFIX = ".hparams_config"
HPARAMS_RECORD = "hparams_config.json"


# TensorBoard's HParams dashboard ticks (shows) at most this many columns by default: those marked
# "differs" first, by name; the others are listed in its left pane to tick.
SHOWN_COLUMNS = 5


def write_hparams_config(tb_dir: str, hparams: list[tuple[str, str]], metric_tags: list[str],
                         shown: list[str]) -> str:
    """Write TensorBoard's HParams experiment config into ``tb_dir`` (replacing an earlier one):
    the columns ``hparams`` (``(name, type)``, type float, bool or string) and the metrics
    ``metric_tags``; the columns ``shown`` (at most SHOWN_COLUMNS) are the ones the dashboard
    ticks. Without a config TensorBoard infers the columns and ticks those that differ between
    trials, so ``outcome`` (every trial completed) or a stage's only parameter (one trial) were
    hidden. Returns the folder written to."""
    import glob

    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from torch.utils.tensorboard import SummaryWriter

    types = {"float": api_pb2.DATA_TYPE_FLOAT64, "bool": api_pb2.DATA_TYPE_BOOL,
             "string": api_pb2.DATA_TYPE_STRING}
    experiment = api_pb2.Experiment(
        # "differs" orders the dashboard's columns (those that differ first) and ticks the first five.
        hparam_infos=[api_pb2.HParamInfo(name=name, type=types[kind], differs=name in shown)
                      for name, kind in hparams],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metric_tags])
    for old in glob.glob(os.path.join(glob.escape(tb_dir), "*" + HPARAMS_CONFIG_SUFFIX)):
        os.unlink(old)
    writer = SummaryWriter(tb_dir, filename_suffix=HPARAMS_CONFIG_SUFFIX)
    try:
        content = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(experiment=experiment))
        writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=metadata.EXPERIMENT_TAG,
                                                                    metadata=content)]))
        path = writer.file_writer.get_logdir()
    finally:
        writer.close()
    return path


def _column_type(distribution) -> str:
    """How tensorboard_hparams writes a parameter's values: floats as numbers, bools as bools,
    everything else (ints included) as text."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(distribution, FloatDistribution):
        return "float"
    if isinstance(distribution, CategoricalDistribution):
        choices = [c for c in distribution.choices if c is not None]
        if choices and all(isinstance(c, bool) for c in choices):
            return "bool"
        if choices and all(isinstance(c, float) for c in choices):
            return "float"
    return "string"


def reported_tags(metrics: dict[str, Any]) -> list[str]:
    """The TensorBoard tags a trial's per-epoch metrics are written under (virface.stages.RunLog),
    leaving out what Tune adds to a result (times, ids, iteration counters)."""
    from virface.metrics import EPOCH_METRICS, tensorboard_tag

    tags = []
    for key, value in metrics.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        tag = tensorboard_tag(key)
        if not tag.startswith("train/") or key in EPOCH_METRICS:
            tags.append(tag)
    return sorted(set(tags))


def write_stage_hparams(experiment_dir: str, stage: str, parameters, results_metrics: list[dict]) -> None:
    """The HParams config of a finished stage's TensorBoard folder (``<stage>/tb``: every searched
    parameter listed; ticked: the outcome and the first four parameters), and the experiment's
    (``<experiment>/``: every stage's columns, for ``tensorboard --logdir <experiment>``, which
    reads the first config it finds, the top folder's; ticked: outcome, stage and three
    parameters).
    Each stage's columns are recorded in ``<stage>/tb/hparams_config.json`` for the latter."""
    import json

    from virface.fileio import write_text_atomic
    from virface.stage_table import STAGES

    hparams = [("outcome", "string")] + [(p.name, _column_type(p.distribution)) for p in parameters] \
        + [("stage", "string")]
    tags = sorted({tag for metrics in results_metrics for tag in reported_tags(metrics)})
    tb_dir = os.path.join(experiment_dir, stage, "tb")
    os.makedirs(tb_dir, exist_ok=True)
    # Shown: the outcome and the space's first parameters (a stage's own folder has one stage).
    write_hparams_config(tb_dir, hparams, tags, [n for n, _ in hparams[:SHOWN_COLUMNS]])
    write_text_atomic(os.path.join(tb_dir, HPARAMS_RECORD),
                      json.dumps({"hparams": hparams, "metrics": tags}, indent=2) + "\n")
    columns, all_tags = [("outcome", "string")], set()
    for name in STAGES:
        try:
            with open(os.path.join(experiment_dir, name, "tb", HPARAMS_RECORD), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        columns += [tuple(c) for c in record["hparams"] if c[0] not in {n for n, _ in columns} | {"stage"}]
        all_tags.update(record["metrics"])
    columns.append(("stage", "string"))
    write_hparams_config(experiment_dir, columns, sorted(all_tags),
                         ["outcome", "stage"] + [n for n, _ in columns[1:SHOWN_COLUMNS - 1]])


class TrialProgress(Callback):
    """Prints the search's progress and writes each trial's HParams entry when it ends."""

    def __init__(self, stage: str, metric: str, parameter_names: list[str], num_samples: int,
                 max_epochs: int, max_concurrent: int, tb_root: str, print_lines: bool = True):
        self.stage, self.metric, self.parameter_names = stage, metric, list(parameter_names)
        self.num_samples, self.max_epochs = num_samples, max_epochs
        self.max_concurrent = max(1, max_concurrent)
        self.tb_root, self.print_lines = tb_root, print_lines
        self.index: dict[str, int] = {}          # trial id -> 1-based order of start
        self.started_at: dict[str, float] = {}
        self.full_trial_s: dict[str, float] = {}   # estimated length of a full trial, per trial
        self.last_step: dict[str, tuple] = {}
        self.printed_eval: dict[str, set] = {}     # trial id -> {(epoch, pair set)} printed
        self.next_poll = 0.0

    # -- helpers

    def tb_dir(self, trial) -> str:
        return os.path.join(self.tb_root, f"{self.stage}_{trial.trial_id}")

    def say(self, trial, text: str) -> None:
        if self.print_lines:
            number = self.index.get(trial.trial_id)
            where = f"trial {number}/{self.num_samples} " if number else "trial "
            print(f"[{self.stage}] {where}{trial.trial_id} {text}", flush=True)

    def params(self, trial) -> dict[str, Any]:
        config = trial.config or {}
        return {k: config[k] for k in self.parameter_names if k in config}

    def stage_left_s(self, running_left: list[float]) -> float | None:
        """Upper bound on the stage's time left: running trials' time left, plus the trials not
        started yet at the mean full-trial length, spread over the concurrent slots."""
        not_started = max(0, self.num_samples - len(self.index))
        if not_started and not self.full_trial_s:
            return None
        estimates = list(self.full_trial_s.values())
        mean_full = sum(estimates) / len(estimates) if estimates else 0.0
        return (sum(running_left) + not_started * mean_full) / self.max_concurrent

    # -- Tune hooks (driver side)

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id not in self.index:
            self.index[trial.trial_id] = len(self.index) + 1
        self.started_at[trial.trial_id] = time.time()
        params = ", ".join(f"{k}={format_value(v)}" for k, v in self.params(trial).items())
        self.say(trial, f"started: {params}" if params else "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.say_evaluated(trial)        # the epoch's pair sets, before its result line
        value, best = result.get(self.metric), result.get(f"best_{self.metric}")
        parts = [f"{self.metric}={value:.4f}" if isinstance(value, (int, float)) else "",
                 f"(best {best:.4f})" if isinstance(best, (int, float)) else ""]
        if isinstance(result.get("loss"), (int, float)) and self.metric != "loss":
            parts.append(f"loss={result['loss']:.4g}")
        self.say(trial, f"| epoch {result.get('epoch')}/{self.max_epochs}: "
                        + " ".join(p for p in parts if p))

    def on_step_end(self, iteration, trials, **info):
        now = time.time()
        if now < self.next_poll:
            return
        self.next_poll = now + POLL_EVERY_S
        lines, running_left = [], []
        for trial in trials:
            if trial.status != "RUNNING":
                continue
            progress = read_progress(self.tb_dir(trial))
            if progress is None:
                continue
            running_left.append(progress.run_left_s)
            key = (progress.epoch, progress.step)
            # Time so far (start-up included) plus the trial's own estimate of what is left.
            elapsed = now - self.started_at.get(trial.trial_id, now)
            self.full_trial_s[trial.trial_id] = elapsed + progress.run_left_s
            if self.last_step.get(trial.trial_id) != key:
                self.last_step[trial.trial_id] = key
                lines.append((trial, progress))
        for trial, progress in lines:
            stage_left = self.stage_left_s(running_left)
            self.say(trial, f"| epoch {progress.epoch}/{progress.max_epoch} step {progress.step}/"
                            f"{progress.steps} | loss {progress.loss:.4g} | "
                            f"{progress.samples_per_s:,.0f} img/s | trial "
                            f"{format_duration(progress.run_left_s)} left | stage <= "
                            f"{format_duration(stage_left)} left")
        for trial in trials:
            if trial.status == "RUNNING":
                self.say_evaluated(trial)

    def say_evaluated(self, trial) -> None:
        """A line per pair set the trial scored since the last look (its eval_progress.json)."""
        printed = self.printed_eval.setdefault(trial.trial_id, set())
        for scored in read_eval_progress(self.tb_dir(trial)):
            if (scored.epoch, scored.name) not in printed:
                printed.add((scored.epoch, scored.name))
                self.say(trial, f"| epoch {scored.epoch}/{scored.max_epoch} evaluated {scored.name} "
                                f"({scored.index}/{scored.count}): {scored.pairs:,} pairs, "
                                f"{scored.pairs_per_s:,.0f} pairs/s | evaluation "
                                f"{format_duration(scored.left_s)} left")

    def _finish(self, trial, error: bool) -> None:
        result = trial.last_result or {}
        epochs = int(result.get("epoch", 0) or 0)
        outcome = trial_outcome(epochs, self.max_epochs, error)
        elapsed = time.time() - self.started_at.get(trial.trial_id, time.time())
        if epochs and not error:      # measured; scaled to a full trial for one stopped early
            self.full_trial_s[trial.trial_id] = elapsed * self.max_epochs / epochs
        try:
            write_trial_hparams(self.tb_dir(trial), self.stage, self.params(trial), outcome,
                                self.started_at.get(trial.trial_id))
        except OSError as exc:      # TensorBoard is a view: never fail a search over it
            self.say(trial, f"(TensorBoard HParams not written: {exc})")
        best = result.get(f"best_{self.metric}")
        best_text = f" (best {self.metric}={best:.4f})" if isinstance(best, (int, float)) else ""
        if outcome == OUTCOME_COMPLETED:
            self.say(trial, f"completed {epochs} epoch(s){best_text}")
        elif outcome == OUTCOME_STOPPED:
            self.say(trial, f"stopped early at epoch {epochs}/{self.max_epochs}{best_text}")
        else:
            self.say(trial, f"FAILED: {last_error_line(trial.error_file)}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        # The trial's process or node died: Tune starts it again from its last checkpoint.
        result = trial.last_result or {}
        self.say(trial, f"failed at epoch {result.get('epoch', 0)} ({last_error_line(trial.error_file)}); "
                        f"retrying from its last checkpoint")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, error=True)


def last_error_line(error_file: str | None) -> str:
    if not error_file or not os.path.exists(error_file):
        return "(no error file)"
    with open(error_file) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    # The last line of a traceback holds the exception and its message.
    return lines[-1] if lines else "(empty error file)"


class StopWhenSaved(Callback):
    """After each step of Tune's loop, hands the trials to the search's stop handler
    (``virface.search.runner.sigterm_as_sigint``): after a Ctrl-C or SIGTERM it stops Tune once
    no trial is saving a reported checkpoint, so that Tune's last snapshot names every
    checkpoint its trials reported. Holds nothing: Tune pickles its callbacks with the run,
    and a resumed run unpickles them."""

    def on_step_end(self, iteration, trials, **info):
        stop = getattr(signal.getsignal(signal.SIGTERM), "stop_tune_when_saved", None)
        if stop is not None:
            stop(trials)
