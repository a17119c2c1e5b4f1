"""Searching a stage (and its missing upstream stages) with Ray Tune and Optuna.

Experiment layout, under ``<storage>/<name>/``:
  <stage>/best.json          manifest: best trial, its config, metric, best-epoch checkpoint
  <stage>/tb/<stage>_<id>/   TensorBoard run of each trial (scalars per epoch + HParams)
  <stage>/optuna.journal     the Optuna study (open it with optuna-dashboard)
  <stage>/plots/             Optuna's history and importance plots (--plots)
  search_<stage>/            Tune's experiment state (what --resume restores)
  train_<stage>_<id>/        Ray Train runs of multi-worker trials
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from virface.config import TrainConfig
from virface.errors import VirFaceError
from virface.search.manifest import (StageManifest, manifest_path, plan_chain, upstream_checkpoint,
                                     write_manifest)
from virface.search.space import SearchSpace, default_space_path, load_search_space
from virface.search.trial import CHECKPOINT_FILE, TrialSetup, run_trial, trial_resources

# The smallest real run: every stage trains and evaluates, for seconds. Used by the tests.
SMOKE_FIXED = {"max_epoch": 1, "steps_per_epoch": 3}
SMOKE_SYNTHETIC = {"n_labeled_ids": 16, "images_per_labeled_id": 6, "n_unlabeled_ids": 40,
                   "n_val_ids": 16, "val_pairs": 100}
SMOKE_NUM_SAMPLES = 1


class SearchError(VirFaceError):
    """A stage's search produced no usable trial."""


@dataclass
class SearchOptions:
    stage: str
    storage: str = "experiments"
    name: str = "default"
    space: str | None = None             # None: search_spaces/<stage>.yaml (per stage of the chain)
    data: dict[str, Any] = field(default_factory=dict)   # TrainConfig data fields
    arch: str | None = None              # pretrain's backbone (overrides the YAML)
    workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    num_samples: int | None = None
    max_concurrent: int | None = None
    address: str | None = None
    resume: bool = False
    from_checkpoint: str | None = None
    budget: str = "default"              # "default" | "smoke"
    plots: bool = False
    max_failures: int = 1                # Tune retries of an errored trial
    verbose: bool = True

    def __post_init__(self):
        self.storage = os.path.abspath(self.storage)
        if self.from_checkpoint:
            self.from_checkpoint = os.path.abspath(self.from_checkpoint)


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    metric: float | None
    epochs: int
    status: str


@dataclass
class StageOutcome:
    stage: str
    manifest: StageManifest | None
    manifest_path: str | None
    rows: list[TrialRow]
    reused: bool = False
    error: str | None = None


def stage_space(options: SearchOptions, stage: str) -> SearchSpace:
    path = options.space if (options.space and stage == options.stage) else default_space_path(stage)
    space = load_search_space(path, stage)
    fixed = dict(space.fixed)
    if options.arch and stage == "pretrain":
        fixed["arch"] = options.arch
    budget, resources = space.budget, space.resources
    if options.budget == "smoke":
        fixed.update(SMOKE_FIXED)
        budget = replace(budget, num_samples=SMOKE_NUM_SAMPLES, time_budget_s=None)
    if options.num_samples is not None:
        budget = replace(budget, num_samples=options.num_samples)
    if options.max_concurrent is not None:
        budget = replace(budget, max_concurrent_trials=options.max_concurrent)
    for key in ("workers", "cpus_per_worker", "gpus_per_worker"):
        if getattr(options, key) is not None:
            resources = replace(resources, **{key: getattr(options, key)})
    space = replace(space, fixed=fixed, budget=budget, resources=resources)
    if space.scheduler.grace_period > space.max_epochs:
        # A shorter run (--budget smoke) than the file's grace period: ASHA needs grace <= max_t.
        space = replace(space, scheduler=replace(space.scheduler, grace_period=space.max_epochs))
    return space


def base_train_config(options: SearchOptions) -> dict[str, Any]:
    data = dict(options.data)
    if options.budget == "smoke" and not data.get("labeled"):
        data["synthetic"] = {**SMOKE_SYNTHETIC, **data.get("synthetic", {})}
    return data


def check_upstream(stage: str, checkpoint: str | None, base: dict[str, Any], space: SearchSpace) -> None:
    """Named errors before any trial starts: a checkpoint the stage cannot start from, or whose
    model does not fit what the stage would build."""
    from virface.stages import build_models, load_models, read_start_checkpoint, resolve_config

    config = TrainConfig.from_dict({**base, **space.fixed, "method": stage, "pretrained_file": checkpoint})
    for key, path in [("labeled", config.labeled), ("unlabeled", config.unlabeled),
                      *((f"val {name}", p) for name, p in config.val.items())]:
        if path is not None and not os.path.exists(path):
            raise SearchError(f"{key}: {path} does not exist")
    state, path = read_start_checkpoint(config)
    if state is None:
        return
    resolved = resolve_config(config, state, path)
    load_models(build_models(resolved), state, path, with_generator=True)


def check_trial_fits(space: SearchSpace) -> None:
    """A trial whose workers the cluster can never hold is an error now, not a trial pending
    forever (Tune waits for resources without a limit)."""
    import ray

    r = space.resources
    need = {"CPU": r.workers * r.cpus_per_worker, "GPU": r.workers * r.gpus_per_worker}
    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        raise SearchError(f"one trial of stage {space.stage} needs {r.workers} worker(s) x "
                          f"({r.cpus_per_worker} CPU, {r.gpus_per_worker} GPU) = {need}, but the Ray "
                          f"cluster has {{'CPU': {have.get('CPU', 0)}, 'GPU': {have.get('GPU', 0)}}}; "
                          f"lower --workers/--cpus-per-worker/--gpus-per-worker or add nodes")


def init_ray(options: SearchOptions) -> bool:
    """Connect to ``--address`` (or the cluster of a ``ray job submit``); else start a local Ray.
    Returns whether this process started Ray (and so must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    if options.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=options.address or None, log_to_driver=False)
        return False
    import torch

    # The dashboard is what lets Tune clean up trials that ASHA stops (notes/RAY.md); it only
    # listens on loopback.
    # address="local": a new Ray of our own even when another cluster runs on this machine.
    ray.init(address="local", num_cpus=os.cpu_count() or 1, num_gpus=torch.cuda.device_count(),
             include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    return True


def trial_progress_callback(stage: str, metric: str, enabled: bool = True):
    """A readable line per trial result, error and end, on stdout (looked up at print time:
    Tune pickles its callbacks)."""
    from ray.tune import Callback

    def summary(result: dict) -> str:
        keys = [metric, "loss", "samples_per_s"]
        return " ".join(f"{k}={result[k]:.4g}" for k in keys if isinstance(result.get(k), (int, float)))

    def line(trial, text: str) -> None:
        if enabled:
            print(f"[{stage}] trial {trial.trial_id} {text}", flush=True)

    class TrialProgress(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            line(trial, f"epoch {result.get('epoch')}: {summary(result)}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            line(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            line(trial, f"ERROR: {_first_line(trial.error_file)}")

    return TrialProgress()


def _first_line(error_file: str | None) -> str:
    if not error_file or not os.path.exists(error_file):
        return "(no error file)"
    with open(error_file) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    # The last line of a traceback holds the exception and its message.
    return lines[-1] if lines else "(empty error file)"


def search_stage(options: SearchOptions, stage: str) -> StageOutcome:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    experiment_dir = os.path.join(options.storage, options.name)
    stage_dir = os.path.join(experiment_dir, stage)
    search_dir = os.path.join(experiment_dir, f"search_{stage}")
    space = stage_space(options, stage)
    base = base_train_config(options)
    upstream, upstream_source = upstream_checkpoint(stage, options.storage, options.name,
                                                   options.from_checkpoint if stage == options.stage else None)
    check_upstream(stage, upstream, base, space)
    check_trial_fits(space)
    if options.verbose:
        print(f"[{stage}] searching {len(space.parameters)} parameter(s) from {space.path}; "
              f"{space.budget.num_samples} trial(s); starts from: {upstream_source}", flush=True)

    setup = TrialSetup(
        stage=stage, base_config={**base, **space.fixed}, upstream_checkpoint=upstream,
        tb_root=os.path.join(stage_dir, "tb"), train_storage=experiment_dir,
        metric=space.metric_name, mode=space.metric_mode, workers=space.resources.workers,
        cpus_per_worker=space.resources.cpus_per_worker, gpus_per_worker=space.resources.gpus_per_worker,
        hparam_names=space.parameter_names)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(setup))
    progress = trial_progress_callback(stage, space.metric_name, options.verbose)
    # Tune's TensorBoard logger is off: each trial writes its own TensorBoard run, live.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Snapshot the experiment state within a second of each result (default: every >= 10 s), so
    # a killed driver's --resume finds every trial's latest checkpoint, not one from 10 s before.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own progress tables: off (verbose=0 is honoured by the classic reporter only).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if options.resume and tune.Tuner.can_restore(search_dir):
        tuner = tune.Tuner.restore(search_dir, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    elif os.path.exists(search_dir):
        raise SearchError(f"{search_dir} holds an unfinished search of stage {stage}; continue it "
                          f"with --resume, or choose another --name")
    else:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        os.makedirs(stage_dir, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(os.path.join(stage_dir, "optuna.journal")))
        searcher = OptunaSearch(space=space.define_by_run, metric=space.metric_name, mode=space.metric_mode,
                                points_to_evaluate=space.points_to_evaluate() or None,
                                sampler=space.make_sampler(), study_name=f"{options.name}-{stage}",
                                storage=storage)
        scheduler = None
        if space.scheduler.type == "asha":
            scheduler = ASHAScheduler(time_attr="epoch", max_t=space.max_epochs,
                                      grace_period=space.scheduler.grace_period,
                                      reduction_factor=space.scheduler.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.metric_name, mode=space.metric_mode, search_alg=searcher,
                scheduler=scheduler, num_samples=space.budget.num_samples,
                max_concurrent_trials=space.budget.max_concurrent_trials,
                time_budget_s=space.budget.time_budget_s,
                trial_dirname_creator=lambda t: f"{stage}_{t.trial_id}",
                reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"search_{stage}", storage_path=experiment_dir, verbose=0,
                failure_config=tune.FailureConfig(max_failures=options.max_failures),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=2, checkpoint_score_attribute=space.metric_name,
                    checkpoint_score_order=space.metric_mode),
                callbacks=[progress, CSVLoggerCallback(), JsonLoggerCallback()]),
        )
    results = tuner.fit()
    rows = [trial_row(r, space) for r in results]
    ok = [r for r in results if r.error is None and r.metrics and space.metric_name in r.metrics]
    if not ok:
        errors = "; ".join(sorted({str(r.error).strip().splitlines()[-1] for r in results if r.error})) or "no results"
        return StageOutcome(stage, None, None, rows, error=f"every trial of stage {stage} failed: {errors}")
    best_path, best_value, best_result = None, None, None
    for result in ok:
        path, value = best_checkpoint_of(result, space.metric_name, space.metric_mode)
        if path and (best_value is None or _better(value, best_value, space.metric_mode)):
            best_path, best_value, best_result = path, value, result
    if best_path is None:
        return StageOutcome(stage, None, None, rows, error=f"stage {stage}: no trial reported a checkpoint")
    from virface.checkpoint import load_checkpoint

    manifest = StageManifest(
        stage=stage, experiment=options.name, trial_id=_trial_id(best_result),
        config=load_checkpoint(best_path)["config"], metric_name=space.metric_name,
        metric_value=float(best_value), metric_mode=space.metric_mode, checkpoint=best_path,
        upstream=upstream)
    path = manifest_path(options.storage, options.name, stage)
    write_manifest(manifest, path)
    if options.plots:
        write_optuna_plots(os.path.join(stage_dir, "optuna.journal"), f"{options.name}-{stage}",
                           os.path.join(stage_dir, "plots"), space.metric_name)
    return StageOutcome(stage, manifest, str(path), rows)


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _trial_id(result) -> str:
    return str(result.metrics.get("trial_id") or os.path.basename(result.path))


def best_checkpoint_of(result, metric: str, mode: str) -> tuple[str | None, float | None]:
    """The trial's best-epoch checkpoint file and its metric value (not merely the last epoch's).

    One-worker trials report checkpoints to Tune, which keeps the best ones by ``metric``; a
    multi-worker trial's checkpoints live in its Ray Train run, found through ``checkpoint_path``.
    """
    candidates = list(result.best_checkpoints or [])
    if not candidates and result.metrics.get("checkpoint_path"):
        import ray.train

        train_run = os.path.dirname(result.metrics["checkpoint_path"])
        candidates = list(ray.train.Result.from_path(train_run).best_checkpoints or [])
    candidates = [(c, m) for c, m in candidates if isinstance(m.get(metric), (int, float))
                  and math.isfinite(m[metric])]
    if not candidates:
        return None, None
    pick = (max if mode == "max" else min)(candidates, key=lambda cm: cm[1][metric])
    return os.path.join(pick[0].path, CHECKPOINT_FILE), float(pick[1][metric])


def trial_row(result, space: SearchSpace) -> TrialRow:
    params = {k: result.config.get(k) for k in space.parameter_names if k in (result.config or {})}
    metrics = result.metrics or {}
    df = result.metrics_dataframe
    values = []
    if df is not None and space.metric_name in df:
        values = [v for v in df[space.metric_name].tolist() if isinstance(v, (int, float)) and math.isfinite(v)]
    best = (max if space.metric_mode == "max" else min)(values) if values else None
    epochs = int(metrics.get("epoch", 0) or 0)
    if result.error is not None:
        status = "ERROR: " + str(result.error).strip().splitlines()[-1][:120]
    elif epochs < space.max_epochs:
        status = f"stopped early (epoch {epochs}/{space.max_epochs})"
    else:
        status = "completed"
    return TrialRow(_trial_id(result) if metrics else os.path.basename(result.path or "?"),
                    params, best, epochs, status)


def write_optuna_plots(journal: str, study_name: str, out_dir: str, metric: str) -> list[str]:
    """Optuna's own optimisation-history and parameter-importance plots, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.visualization import matplotlib as ovm

    study = optuna.load_study(study_name=study_name,
                              storage=JournalStorage(JournalFileBackend(journal)))
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, plot in (("optimization_history", ovm.plot_optimization_history),
                       ("param_importances", ovm.plot_param_importances)):
        try:
            ax = plot(study, target_name=metric)
        except (ValueError, RuntimeError) as exc:   # e.g. importances need 2+ completed trials
            print(f"plot {name} skipped: {exc}", flush=True)
            continue
        path = os.path.join(out_dir, f"{name}.png")
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        written.append(path)
    return written


def format_table(outcome: StageOutcome, metric: str) -> str:
    lines = [f"== stage {outcome.stage}" + (" (reused)" if outcome.reused else "")]
    if outcome.rows:
        header = f"{'trial':<14} {metric:>18}  {'epochs':>6}  {'status':<36} params"
        lines.append(header)
        for r in outcome.rows:
            value = f"{r.metric:.4f}" if r.metric is not None else "-"
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in r.params.items())
            lines.append(f"{r.trial_id:<14} {value:>18}  {r.epochs:>6}  {r.status:<36} {params}")
    if outcome.manifest:
        m = outcome.manifest
        lines.append(f"best: trial {m.trial_id} {m.metric_name}={m.metric_value:.4f}")
        lines.append(f"manifest: {outcome.manifest_path}")
        lines.append(f"checkpoint: {m.checkpoint}")
    if outcome.error:
        lines.append(f"FAILED: {outcome.error}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_search(options: SearchOptions) -> list[StageOutcome]:
    """Search ``options.stage`` and every upstream stage that has no manifest yet, in order."""
    from virface.search.manifest import read_manifest, stage_chain

    plan = plan_chain(options.stage, options.storage, options.name, options.from_checkpoint)
    outcomes: list[StageOutcome] = []
    if not options.from_checkpoint:
        for stage in stage_chain(options.stage):
            if stage not in plan:
                path = manifest_path(options.storage, options.name, stage)
                outcomes.append(StageOutcome(stage, read_manifest(path), str(path), [], reused=True))
    started = init_ray(options)
    try:
        for stage in plan:
            outcome = search_stage(options, stage)
            outcomes.append(outcome)
            if outcome.manifest is None:
                break
    finally:
        if started:
            import ray

            ray.shutdown()
    return outcomes
