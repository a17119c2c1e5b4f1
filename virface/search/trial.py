"""One Tune trial = one stage trained with one sampled config.

- ``workers == 1``: the stage loop runs in the trial's own process (no Train worker group to
  start, so a small trial costs little), and reports through ``ray.tune.report``.
- ``workers > 1``: the trial is a zero-CPU driver that starts a Ray Train ``TorchTrainer``
  (DDP; gloo on CPU, nccl on GPU) running the same loop on every rank; rank 0 reports the
  checkpoint, ``TuneReportCallback`` forwards its metrics to Tune.

Either way the loop is ``virface.stages.run_stage``, unchanged.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from virface.checkpoint import copy_checkpoint
from virface.progress import write_progress
from virface.search.space import ResourcesSpec

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrialSetup:
    """What every trial of a stage shares (the sampled parameters come separately)."""

    stage: str
    base_config: dict[str, Any]          # TrainConfig fields: data options, fixed values
    upstream_checkpoint: str | None      # best-epoch checkpoint of the upstream stage
    tb_root: str                         # <experiment>/<stage>/tb: one run folder per trial
    train_storage: str                   # where Ray Train runs keep their checkpoints
    metric: str
    mode: str
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    worker_max_failures: int = 1


def trial_train_config(setup: TrialSetup, params: dict[str, Any]) -> dict[str, Any]:
    values = {**setup.base_config, **params, "method": setup.stage,
              "pretrained_file": setup.upstream_checkpoint, "resume_file": None,
              "snapshot_prefix": None, "tensorboard": True}
    if setup.resources.gpus_per_worker == 0:
        values["device"] = "cpu"
    return values


def trial_resources(setup: TrialSetup) -> dict[str, float]:
    """Resources Tune reserves for the trial's own process.

    A one-worker trial trains in that process, so it holds the worker's CPU/GPU. A multi-worker
    trial only drives the Train workers; it must not hold the CPU they need (on 2 cores that
    deadlocks: notes/RAY.md), and Ray rejects an all-zero request, hence the token memory.
    """
    if setup.resources.workers == 1:
        res = {"cpu": setup.resources.cpus_per_worker}
        if setup.resources.gpus_per_worker:
            res["gpu"] = setup.resources.gpus_per_worker
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


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    train_config = trial_train_config(setup, params)
    tb_dir = os.path.join(setup.tb_root, f"{setup.stage}_{trial_id}")
    if setup.resources.workers == 1:
        _run_in_process(train_config, tb_dir)
    else:
        _run_with_train_workers(train_config, tb_dir, setup, trial_id)


def _run_in_process(train_config: dict[str, Any], tb_dir: str) -> None:
    from ray import tune

    from virface.config import TrainConfig
    from virface.stages import run_stage

    checkpoint = tune.get_checkpoint()
    work = tempfile.mkdtemp(prefix="virface-trial-")
    try:
        if checkpoint is not None:
            # Tune restored this trial: continue from its last reported epoch.
            with checkpoint.as_directory() as d:
                copy_checkpoint(os.path.join(d, CHECKPOINT_FILE), os.path.join(work, "resume.pt"))
            train_config = {**train_config, "resume_file": os.path.join(work, "resume.pt"),
                            "pretrained_file": None}
        config = TrainConfig.from_dict(train_config)

        def report(metrics: dict[str, Any], checkpoint_path: str | None) -> None:
            with tempfile.TemporaryDirectory(dir=work) as d:
                copy_checkpoint(checkpoint_path, os.path.join(d, CHECKPOINT_FILE))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

        run_stage(config, os.path.join(work, "run"), on_epoch_end=report, tb_dir=tb_dir,
                  on_progress=lambda progress: write_progress(tb_dir, progress),
                  keep_epoch_checkpoints=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    from virface.config import TrainConfig
    from virface.distributed import DistributedContext
    from virface.stages import run_stage

    context = ray.train.get_context()
    ctx = DistributedContext(ray.train.torch.get_device(), context.get_world_rank(),
                             context.get_world_size())
    train_config = dict(loop_config["train"])
    work = tempfile.mkdtemp(prefix=f"virface-rank{ctx.rank}-")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            copy_checkpoint(os.path.join(d, CHECKPOINT_FILE), os.path.join(work, "resume.pt"))
        train_config.update(resume_file=os.path.join(work, "resume.pt"), pretrained_file=None)
    config = TrainConfig.from_dict(train_config)

    def report(metrics: dict[str, Any], checkpoint_path: str | None) -> None:
        name = f"checkpoint_epoch={metrics['epoch']:03d}"
        if checkpoint_path is None:           # every rank must call report; rank 0 brings the file
            ray.train.report(metrics, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(dir=work) as d:
            copy_checkpoint(checkpoint_path, os.path.join(d, CHECKPOINT_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=name)

    tb_dir = loop_config["tb_dir"]
    try:
        run_stage(config, os.path.join(work, "run"), ctx=ctx, on_epoch_end=report,
                  tb_dir=tb_dir if ctx.is_main else None,
                  on_progress=lambda progress: write_progress(tb_dir, progress),
                  keep_epoch_checkpoints=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_with_train_workers(train_config: dict[str, Any], tb_dir: str, setup: TrialSetup,
                            trial_id: str) -> None:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    use_gpu = setup.resources.gpus_per_worker > 0
    per_worker = {"CPU": setup.resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = setup.resources.gpus_per_worker
    trainer = TorchTrainer(
        train_worker_loop,
        train_loop_config={"train": train_config, "tb_dir": tb_dir},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=setup.resources.workers, use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            # Deterministic name: a restored Tune trial finds its Train run and checkpoints again.
            name=f"train_{setup.stage}_{trial_id}",
            storage_path=setup.train_storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=setup.metric,
                checkpoint_score_order=setup.mode),
            # A dead worker restarts the group from the last checkpoint; a group that cannot
            # start (too few resources) fails instead of retrying forever.
            failure_config=ray.train.FailureConfig(max_failures=setup.worker_max_failures,
                                                   controller_failure_limit=0),
        ),
    )
    trainer.fit()
