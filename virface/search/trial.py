"""One Tune trial = one stage trained with one sampled config.

- ``workers == 1``: the stage loop runs in the trial's own process (no worker group to start,
  so a small trial costs little), and reports through ``ray.tune.report``.
- ``workers > 1``: the trial's placement group holds one bundle per rank; the trial (a
  zero-resource driver) starts one :class:`RankWorker` actor in each bundle, joins them into a
  torch.distributed group (gloo on CPU, nccl on GPU) and steps them through the stage an epoch
  at a time (:class:`virface.stages.StageRun`), reporting rank 0's metrics and checkpoint to Tune
  after each. Ray Train's ``TorchTrainer`` did the same with a controller and fresh worker
  processes per trial, which cost 15-25 s to start on a 2-core machine (docs/RESULTS.md); a rank
  that dies fails the trial, which Tune restarts from its last checkpoint (``--max_failures``).

Either way the loop is the library's own, unchanged.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from virface.checkpoint import copy_checkpoint, load_checkpoint
from virface.errors import CheckpointError
from virface.progress import write_progress
from virface.search.space import ResourcesSpec

# What a trial reports to Tune after each epoch is one directory holding:
CHECKPOINT_FILE = "checkpoint.pt"   # the epoch's checkpoint: what a restored trial resumes from
BEST_FILE = "best.pt"               # the trial's best epoch so far, when that is an earlier epoch
# (when it is this epoch, CHECKPOINT_FILE is the best and BEST_FILE is left out). Each directory
# is complete on its own, so Tune keeps only the most recent ones (checkpoint_retention).
CHECKPOINTS_KEPT = 2
# The categorical parameter of a stage that starts from one of several carried upstream
# checkpoints (--carry_top): its value is the upstream trial's id.
UPSTREAM_PARAMETER = "upstream"


@dataclass
class TrialSetup:
    """What every trial of a stage shares (the sampled parameters come separately)."""

    stage: str
    base_config: dict[str, Any]          # TrainConfig fields: data options, fixed values
    upstream_checkpoint: str | None      # best-epoch checkpoint of the upstream stage
    tb_root: str                         # <experiment>/<stage>/tb: one run folder per trial
    train_storage: str                   # shared folder for multi-worker trials' checkpoints
    metric: str
    mode: str
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    measure_cost: bool = False           # report params, macs and latency_ms (virface.cost)
    # Upstream trial id -> its checkpoint, when the upstream stage carried several (--carry_top):
    # each trial starts from the one its ``upstream`` parameter names.
    upstream_choices: dict[str, str] = field(default_factory=dict)


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


def trial_resources(setup: TrialSetup):
    """What Tune reserves for a trial. A one-worker trial trains in its own process, so that
    process holds the worker's CPU/GPU. A multi-worker trial's process only drives its ranks:
    an empty bundle for it, then one bundle per rank (its actors are placed in them)."""
    r = setup.resources
    if r.workers == 1:
        res = {"cpu": r.cpus_per_worker}
        if r.gpus_per_worker:
            res["gpu"] = r.gpus_per_worker
        return res
    from ray import tune

    rank = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    return tune.PlacementGroupFactory([{}] + [rank] * r.workers, strategy="PACK")


def trials_at_once(resources: ResourcesSpec, cluster: dict[str, float]) -> int:
    """How many trials of ``resources`` a cluster with these totals (``ray.cluster_resources()``)
    runs side by side: its CPUs and GPUs divided among the trials' workers. Fractional GPUs
    (``gpus_per_worker: 0.25``) put several small trials on one GPU, four here."""
    cpus = resources.workers * resources.cpus_per_worker
    fits = [int(cluster.get("CPU", 0.0) // cpus + 1e-9)]
    if resources.gpus_per_worker:
        fits.append(int(cluster.get("GPU", 0.0) / (resources.workers * resources.gpus_per_worker) + 1e-9))
    return max(0, min(fits))


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


def best_file_in(checkpoint_dir: str) -> str:
    """The trial's best-epoch checkpoint as of the epoch that reported ``checkpoint_dir``."""
    best = os.path.join(checkpoint_dir, BEST_FILE)
    return best if os.path.isfile(best) else os.path.join(checkpoint_dir, CHECKPOINT_FILE)


def best_checkpoint_of(result, metric: str) -> tuple[str | None, float | None]:
    """A finished trial's best-epoch checkpoint file and its ``metric`` value (not merely the last
    epoch's): the best file of its latest reported directory (the one Tune always keeps), valued
    at its last result's ``best_<metric>``. ``(None, None)`` without a checkpoint or a finite value.
    """
    checkpoint = getattr(result, "checkpoint", None)
    value = (result.metrics or {}).get(f"best_{metric}")
    if checkpoint is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, None
    return best_file_in(checkpoint.path), float(value)


def _link_or_copy(source: str, target: str) -> str:
    """``target`` becomes ``source``'s content: a hard link (no bytes written) where the file
    system allows one, else an atomic copy. Checkpoints are never rewritten in place (they are
    saved by rename), so a linked file never changes under its other name."""
    temporary = f"{target}.{os.getpid()}.link"
    try:
        os.link(source, temporary)
        os.replace(temporary, target)
        return target
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return copy_checkpoint(source, target)


_TUNE_CHECKPOINT_DIR = re.compile(r"checkpoint_\d+")    # how Tune names a trial's reported directories


def complete_reported(checkpoint_dir: str) -> dict[str, Any] | None:
    """The epoch's checkpoint in a reported directory if the directory is whole (its checkpoint
    loads, and so does the best epoch's file it names), else None."""
    try:
        state = load_checkpoint(os.path.join(checkpoint_dir, CHECKPOINT_FILE))
        best_epoch = (state.get("best") or {}).get("epoch", state["epoch"])
        if best_epoch != state["epoch"] and load_checkpoint(os.path.join(checkpoint_dir, BEST_FILE))["epoch"] != best_epoch:
            return None
        return state
    except (CheckpointError, KeyError, OSError):
        return None


def newest_reported(checkpoint_dir: str) -> str:
    """The newest whole directory among ``checkpoint_dir`` (the one Tune restores a trial from) and
    the later ones the trial reported beside it. Tune's snapshot of the experiment lags behind
    the trial's reports: a driver killed in between (a ``kill -9`` right after a trial finished)
    restores the trial from an earlier epoch, and the epochs after it, up to a whole finished
    trial, were trained again."""
    folder, name = os.path.split(os.path.normpath(checkpoint_dir))
    if not _TUNE_CHECKPOINT_DIR.fullmatch(name):
        return checkpoint_dir
    later = sorted((d for d in os.listdir(folder) if _TUNE_CHECKPOINT_DIR.fullmatch(d) and d > name), reverse=True)
    for candidate in later:
        if complete_reported(os.path.join(folder, candidate)) is not None:
            return os.path.join(folder, candidate)
    return checkpoint_dir


class ReportedCheckpoints:
    """A trial's checkpoints for Tune, made in ``work`` (a folder of the trial's own): after each
    epoch a directory with that epoch's ``CHECKPOINT_FILE`` and, when an earlier epoch is the
    best so far, its ``BEST_FILE``. ``report`` is ``ray.tune.report`` (a test passes its own)."""

    def __init__(self, work: str, report: Callable[..., None] | None = None):
        self.work = work
        self.best = os.path.join(work, BEST_FILE)     # the best epoch's checkpoint so far
        self._report = report
        self._unseen: str | None = None     # a restored epoch Tune has not seen reported

    def restore(self, checkpoint_dir: str) -> str:
        """Continue from a reported directory (Tune restored the trial), or from a later one the
        trial reported beside it that Tune's snapshot missed (:func:`newest_reported`): its best
        epoch stays the best so far. Returns the checkpoint to resume the run from."""
        newest = newest_reported(checkpoint_dir)
        # Tune numbers the trial's next reports on from the directory it restored, into the later
        # directories: a file linked from one of them would be overwritten by its own copy.
        place = _link_or_copy if newest == checkpoint_dir else copy_checkpoint
        resume = place(os.path.join(newest, CHECKPOINT_FILE), os.path.join(self.work, "resume.pt"))
        place(best_file_in(newest), self.best)
        self._unseen = resume if newest != checkpoint_dir else None
        return resume

    def report_unseen(self, extra: dict[str, Any]) -> None:
        """After a restore from a directory Tune's snapshot missed: report that epoch again (not
        trained again), so that Tune, its scheduler and the study see it; a trial that had
        finished ends here. ``extra``: what every report carries besides the epoch's metrics."""
        if self._unseen is not None:
            state = load_checkpoint(self._unseen)
            best_epoch = (state.get("best") or {}).get("epoch", state["epoch"])
            self.report({**state["metrics"], **extra}, self._unseen, best_epoch)
            self._unseen = None

    def report(self, metrics: dict[str, Any], checkpoint_path: str, best_epoch: int) -> None:
        """Report an epoch's ``metrics`` with its checkpoint; ``best_epoch`` is the run's best
        epoch so far (``StageRun.best``), this one or an earlier one."""
        from ray import tune

        report = self._report or tune.report

        with tempfile.TemporaryDirectory(dir=self.work) as d:
            current = _link_or_copy(checkpoint_path, os.path.join(d, CHECKPOINT_FILE))
            if best_epoch == metrics["epoch"]:
                _link_or_copy(current, self.best)
            else:
                _link_or_copy(self.best, os.path.join(d, BEST_FILE))
            report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    train_config = trial_train_config(setup, params)
    tb_dir = os.path.join(setup.tb_root, f"{setup.stage}_{trial_id}")
    if setup.resources.workers == 1:
        _run_in_process(train_config, tb_dir, setup.measure_cost)
    else:
        _run_with_ranks(train_config, tb_dir, setup, trial_id)


def run_cost(run) -> dict[str, float]:
    """params, macs and latency_ms of a StageRun's backbone, at its input size, on its device."""
    from virface.cost import model_cost

    return model_cost(run.models.backbone, run.config.input_size, run.ctx.device)


def _run_in_process(train_config: dict[str, Any], tb_dir: str, measure_cost: bool = False) -> None:
    from ray import tune

    from virface.config import TrainConfig
    from virface.stages import StageRun

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
                checkpoints.report({**metrics, **cost}, path, run.best["epoch"])
        finally:
            run.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


class RankWorker:
    """One DDP rank of a multi-worker trial (made a Ray actor by :func:`_run_with_ranks`)."""

    def address(self) -> tuple[str, int]:
        """This node's address and a free port on it, for the group's rendezvous (rank 0)."""
        import socket

        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return host, s.getsockname()[1]

    def alive(self) -> bool:
        return True

    def start(self, backend: str, init_method: str, rank: int, world: int, train_config: dict[str, Any],
              run_dir: str | None, tb_dir: str) -> None:
        import ray
        import torch
        import torch.distributed as dist

        from virface.config import TrainConfig
        from virface.distributed import DistributedContext
        from virface.stages import StageRun

        # A group reused from the trial before keeps its process group.
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
        device = torch.device("cuda", 0) if ray.get_gpu_ids() else torch.device("cpu")
        ctx = DistributedContext(device, rank, world)
        # Rank 0 writes the run (checkpoints on shared storage); the others only train.
        self.work = tempfile.mkdtemp(prefix=f"virface-rank{rank}-")
        self.run = StageRun(TrainConfig.from_dict(train_config), run_dir or os.path.join(self.work, "run"),
                            ctx=ctx, tb_dir=tb_dir if rank == 0 else None,
                            on_progress=lambda progress: write_progress(tb_dir, progress),
                            keep_epoch_checkpoints=False)

    def done(self) -> bool:
        return self.run.done

    def cost(self) -> dict[str, float]:
        return run_cost(self.run)

    def epoch(self) -> tuple[dict[str, Any], str | None, int]:
        """The next epoch's metrics, checkpoint (rank 0's; None on the others) and the run's best
        epoch so far."""
        metrics, path = self.run.run_epoch()
        return metrics, path, self.run.best["epoch"]

    def close(self) -> None:
        if getattr(self, "run", None) is not None:
            self.run.close()
            self.run = None
            shutil.rmtree(self.work, ignore_errors=True)


# Ranks outlive their trial when Tune reuses the trial's process (and its placement group) for
# the next trial of the same shape: starting processes and importing torch is most of a
# multi-worker trial's start-up. Keyed by the placement group; a rank that died empties it.
_RANKS: dict[str, list] = {}


def _ranks_for(group, resources: ResourcesSpec) -> list:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    key = f"{group.id.hex()}/{resources}"
    ranks = _RANKS.get(key)
    if ranks:
        try:
            ray.get([rank.alive.remote() for rank in ranks], timeout=10)
            return ranks
        except Exception:          # a dead or stuck rank: start the group anew
            _drop_ranks()
    _drop_ranks()
    # The ranks' bundles are the last ones (Tune drops an empty head bundle).
    first = len(group.bundle_specs) - resources.workers
    worker = ray.remote(RankWorker)
    ranks = [worker.options(num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(
                                placement_group=group, placement_group_bundle_index=first + i)).remote()
             for i in range(resources.workers)]
    _RANKS[key] = ranks
    return ranks


def _all_ranks(calls: list) -> list:
    """The results of one call on every rank. A rank that fails fails them all at once: the
    others may be waiting for it in a collective, so the group is taken down, not waited for."""
    import ray

    pending, results = list(calls), {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            results[ready[0]] = ray.get(ready[0])
        except Exception:
            _drop_ranks()
            raise
    return [results[call] for call in calls]


def _drop_ranks() -> None:
    import ray

    for ranks in _RANKS.values():
        for rank in ranks:
            ray.kill(rank)
    _RANKS.clear()


def _run_with_ranks(train_config: dict[str, Any], tb_dir: str, setup: TrialSetup, trial_id: str) -> None:
    import ray
    from ray import tune

    r = setup.resources
    ranks = _ranks_for(ray.util.get_current_placement_group(), r)
    # On shared storage: every rank reads the resume checkpoint; the trial reads rank 0's.
    shared = os.path.join(setup.train_storage, f"train_{setup.stage}_{trial_id}")
    try:
        os.makedirs(shared, exist_ok=True)
        checkpoints = ReportedCheckpoints(shared)
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                resume = checkpoints.restore(d)
            train_config = {**train_config, "resume_file": resume, "pretrained_file": None}
        host, port = ray.get(ranks[0].address.remote())
        backend = "nccl" if r.gpus_per_worker > 0 else "gloo"
        run_dir = os.path.join(shared, f"run-{os.getpid()}-{int(time.time())}")
        _all_ranks([rank.start.remote(backend, f"tcp://{host}:{port}", k, r.workers, train_config,
                                      run_dir if k == 0 else None, tb_dir)
                    for k, rank in enumerate(ranks)])
        cost = ray.get(ranks[0].cost.remote()) if setup.measure_cost else {}
        checkpoints.report_unseen(cost)
        while not ray.get(ranks[0].done.remote()):
            (metrics, path, best_epoch), *_ = _all_ranks([rank.epoch.remote() for rank in ranks])
            checkpoints.report({**metrics, **cost}, path, best_epoch)
    finally:
        # Done, or stopped between epochs (ASHA stops a trial at its report: the ranks are
        # idle): they close their run and wait for the next trial. A rank that cannot (it
        # died, or an epoch failed) takes the group down.
        try:
            ray.get([rank.close.remote() for rank in ranks], timeout=60)
        except Exception:
            _drop_ranks()
        shutil.rmtree(shared, ignore_errors=True)
