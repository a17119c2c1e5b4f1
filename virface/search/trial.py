"""One Tune trial = one stage trained with one sampled config.

- ``workers == 1``: the stage loop runs in the trial's own process (no worker group to start,
  so a small trial costs little), and reports each epoch's metrics and checkpoint directory
  through ``ray.tune.report``.
- ``workers > 1``: the trial is a driver holding no CPU or GPU; it builds and fits a Ray Train
  ``TorchTrainer`` (virface.ray_train) whose workers run the stage as DDP ranks (gloo on CPU,
  nccl on GPU). Ray Train restarts a failed worker group from the last checkpoint and persists
  the checkpoints under ``<experiment>/train_<stage>_<trial id>/``; ``TuneReportCallback``
  forwards each epoch's metrics to Tune with the path of its persisted checkpoint
  (``checkpoint_path``). A trial that Tune restores or retries builds a trainer of the same name,
  which continues from that run's last checkpoint.

Either way the loop is the library's own, unchanged, and each reported checkpoint directory has
the same layout (virface.ray_train.ReportedCheckpoints).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from virface.progress import write_progress
from virface.ray_train import CHECKPOINTS_KEPT, ReportedCheckpoints, best_file_in
from virface.search.space import ResourcesSpec
from virface.storage import join

# The categorical parameter of a stage that starts from one of several carried upstream
# checkpoints (--carry_top): its value is the upstream trial's id.
UPSTREAM_PARAMETER = "upstream"
# What TuneReportCallback calls the persisted checkpoint of a Ray Train report.
CHECKPOINT_PATH_METRIC = "checkpoint_path"


@dataclass
class TrialSetup:
    """What every trial of a stage shares (the sampled parameters come separately)."""

    stage: str
    base_config: dict[str, Any]          # TrainConfig fields: data options, fixed values
    upstream_checkpoint: str | None      # best-epoch checkpoint of the upstream stage
    tb_root: str                         # <experiment>/<stage>/tb: one run folder per trial
    train_storage: str                   # absolute or a URI; multi-worker trials' Ray Train runs (checkpoints)
    metric: str
    mode: str
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    measure_cost: bool = False           # report params, macs and latency_ms (virface.cost)
    # Upstream trial id -> its checkpoint, when the upstream stage carried several (--carry_top):
    # each trial starts from the one its ``upstream`` parameter names.
    upstream_choices: dict[str, str] = field(default_factory=dict)
    # Restarts of a multi-worker trial's worker group (from its last checkpoint) after a worker
    # fails, before the trial fails (and Tune retries it, --max_failures).
    worker_max_failures: int = 1
    # Remote storage (virface.storage): the URI of ``tb_root`` there. Each trial writes its
    # TensorBoard run into ``tb_root`` on its own node and copies it here after every epoch.
    tb_upload: str | None = None


def trial_train_config(setup: TrialSetup, params: dict[str, Any]) -> dict[str, Any]:
    params = dict(params)
    choice = params.pop(UPSTREAM_PARAMETER, None)
    upstream = setup.upstream_choices[choice] if choice is not None else setup.upstream_checkpoint
    values = {**setup.base_config, **params, "method": setup.stage,
              "pretrained_file": upstream, "resume_file": None,
              "snapshot_prefix": None, "tensorboard": True}
    if setup.resources.gpus_per_worker == 0:
        values["device"] = "cpu"
    return values


def trial_resources(setup: TrialSetup) -> dict[str, float]:
    """What Tune reserves for a trial's own process. A one-worker trial trains in it, so it
    holds the worker's CPU/GPU. A multi-worker trial's process only drives its Ray Train run,
    whose workers Ray Train places itself: holding a CPU too would deadlock a cluster with
    exactly the workers' CPUs (notes/RAY.md), and Ray rejects an all-zero request, hence the
    token memory."""
    r = setup.resources
    if r.workers == 1:
        res = {"cpu": r.cpus_per_worker}
        if r.gpus_per_worker:
            res["gpu"] = r.gpus_per_worker
        return res
    return {"cpu": 0, "memory": 1}


def trials_at_once(resources: ResourcesSpec, cluster: dict[str, float]) -> int:
    """How many trials of ``resources`` a cluster with these totals (``ray.cluster_resources()``)
    runs side by side: its CPUs and GPUs divided among the trials' workers. Fractional GPUs
    (``gpus_per_worker: 0.25``) put several small trials on one GPU, four here."""
    cpus = resources.workers * resources.cpus_per_worker
    fits = [int(cluster.get("CPU", 0.0) // cpus + 1e-9)]
    if resources.gpus_per_worker:
        fits.append(int(cluster.get("GPU", 0.0) / (resources.workers * resources.gpus_per_worker) + 1e-9))
    return max(0, min(fits))


def concurrent_trials(resources: ResourcesSpec, configured: int | None,
                      cluster: dict[str, float]) -> int | None:
    """Tune's ``max_concurrent_trials``. Multi-worker trials reserve nothing for themselves (their
    Ray Train workers are placed by Ray Train), so Tune would start more than fit, each
    waiting for its worker group: at most what the cluster holds side by side."""
    if resources.workers == 1:
        return configured
    fits = max(1, trials_at_once(resources, cluster))
    return min(configured, fits) if configured else fits


def reuses_actors(resources: ResourcesSpec) -> bool:
    """Whether Tune may reuse a trial's process for the next trial: a one-worker trial's, yes.
    A multi-worker trial's Ray Train controller and workers belong to its process; a trial that
    ASHA stops must take them down with it, which a reused process would not."""
    return resources.workers == 1


def checkpoint_retention():
    """Tune's retention of each trial's reported directories: the ``CHECKPOINTS_KEPT`` most
    recent, by recency and never by score.

    Tune deletes a directory the moment a newer one is registered, before its next experiment
    snapshot, while a snapshot taken earlier may still name it as the trial's latest: that is the
    directory a ``--resume`` after a ``kill -9`` restores the trial from. Kept by score, it could
    be the one deleted (a better newer epoch pushes out a worse latest one), and the running trial
    was lost. Kept by recency, the latest and the one before it are kept, and the snapshot moves
    on at least every ``num_to_keep`` checkpoints (Tune forces it) and every second (the search's
    ``TUNE_GLOBAL_CHECKPOINT_S``). With 1, the directory the snapshot names would be deleted as
    soon as the next one arrives, before the snapshot catches up.
    """
    from ray import tune

    return tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)


def best_checkpoint_of(result, metric: str, storage_root: str | None = None) -> tuple[str | None, float | None]:
    """A finished trial's best-epoch checkpoint file and its ``metric`` value (not merely the last
    epoch's): the best file of its latest reported directory (the one Tune, or for a multi-worker
    trial Ray Train, always keeps), valued at its last result's ``best_<metric>``. ``(None, None)``
    without a checkpoint or a finite value. ``storage_root``: the search's storage URI, when it
    is remote: Ray gives paths on its file system (``bucket/key``), made URIs like it.
    """
    checkpoint = getattr(result, "checkpoint", None)
    metrics = result.metrics or {}
    # A multi-worker trial's checkpoints are Ray Train's; Tune has their paths.
    directory = checkpoint.path if checkpoint is not None else metrics.get(CHECKPOINT_PATH_METRIC)
    value = metrics.get(f"best_{metric}")
    if not directory or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, None
    if storage_root is not None:
        from virface.storage import uri_for

        directory = uri_for(storage_root, directory)
    return best_file_in(directory), float(value)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    train_config = trial_train_config(setup, params)
    run_name = f"{setup.stage}_{trial_id}"
    tb_dir = os.path.join(setup.tb_root, run_name)
    tb_upload = join(setup.tb_upload, run_name) if setup.tb_upload else None
    if setup.resources.workers == 1:
        _run_in_process(train_config, tb_dir, setup.measure_cost, tb_upload)
    else:
        _run_on_ray_train(train_config, tb_dir, setup, trial_id, tb_upload)


def _run_in_process(train_config: dict[str, Any], tb_dir: str, measure_cost: bool = False,
                    tb_upload: str | None = None) -> None:
    from ray import tune

    from virface.config import TrainConfig
    from virface.cost import run_cost
    from virface.stages import StageRun
    from virface.storage import TreeSync

    tb_sync = TreeSync(tb_dir, tb_upload)

    checkpoint = tune.get_checkpoint()
    work = tempfile.mkdtemp(prefix="virface-trial-")
    checkpoints = ReportedCheckpoints(work)
    try:
        if checkpoint is not None:
            # Tune restored this trial: continue from its last reported epoch.
            with checkpoint.as_directory() as d:
                resume = checkpoints.restore(d)
            train_config = {**train_config, "resume_file": resume, "pretrained_file": None}
        run = StageRun(TrainConfig.from_dict(train_config), os.path.join(work, "run"), tb_dir=tb_dir,
                       on_progress=lambda progress: write_progress(tb_dir, progress),
                       keep_epoch_checkpoints=False)
        try:
            # The model's cost, measured once before training, goes into every report.
            cost = run_cost(run) if measure_cost else {}
            checkpoints.report_unseen(cost)
            while not run.done:
                metrics, path = run.run_epoch()
                tb_sync.sync()          # the epoch's TensorBoard points, before it counts
                checkpoints.report({**metrics, **cost}, path, run.best["epoch"])
        finally:
            run.close()
            tb_sync.sync()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_run_name(stage: str, trial_id: str) -> str:
    """The Ray Train run of a multi-worker trial: deterministic, so that the trial restored or
    retried by Tune finds its run, and continues from its last checkpoint."""
    return f"train_{stage}_{trial_id}"


def _run_on_ray_train(train_config: dict[str, Any], tb_dir: str, setup: TrialSetup, trial_id: str,
                      tb_upload: str | None = None) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from virface.ray_train import stage_trainer

    r = setup.resources
    trainer = stage_trainer(
        train_config, workers=r.workers, cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker,
        storage=setup.train_storage, name=train_run_name(setup.stage, trial_id),
        max_failures=setup.worker_max_failures, tb_dir=tb_dir, progress_dir=tb_dir, tb_upload=tb_upload,
        measure_cost=setup.measure_cost, callbacks=[TuneReportCallback()])
    trainer.fit()
