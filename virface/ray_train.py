"""One stage, data-parallel on Ray Train.

Ray Train's ``TorchTrainer`` places the workers (across nodes), sets up their process group and
its environment (gloo on CPU, nccl on GPU), restarts the group from the last checkpoint when a
worker dies (``FailureConfig``) and persists what rank 0 reports to the run's storage. Each
worker runs the library's own stage loop (:class:`virface.stages.StageRun`), unchanged, and
reports every epoch with ``ray.train.report``.

Two callers: ``virface-train --workers N`` (:func:`train_data_parallel`: one stage, no search,
the same run folder as a one-process run) and a search trial with ``workers > 1``
(virface.search.trial, which adds Tune's ``TuneReportCallback`` so that each epoch's metrics and
checkpoint path reach Tune).

What is reported after each epoch, to Tune by a one-worker trial or to Ray Train by rank 0, is
one directory (:class:`ReportedCheckpoints`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable

from virface.checkpoint import copy_checkpoint, load_checkpoint
from virface.errors import CheckpointError, ConfigError, VirFaceError

CHECKPOINT_FILE = "checkpoint.pt"   # the epoch's checkpoint: what a restarted run resumes from
BEST_FILE = "best.pt"               # the run's best epoch so far, when that is an earlier epoch
# (when it is this epoch, CHECKPOINT_FILE is the best and BEST_FILE is left out). Each directory
# is complete on its own, so only the most recent ones are kept.
CHECKPOINTS_KEPT = 2
# A worker group that cannot start (too few resources) is retried this often, not forever
# (Ray Train's default).
CONTROLLER_FAILURE_LIMIT = 3
API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"     # where Ray's state API finds the dashboard

log = logging.getLogger("virface")


def best_file_in(checkpoint_dir: str) -> str:
    """The run's best-epoch checkpoint as of the epoch that reported ``checkpoint_dir`` (a folder
    or a storage URI)."""
    from virface import storage

    best = storage.join(checkpoint_dir, BEST_FILE)
    return best if storage.is_file(best) else storage.join(checkpoint_dir, CHECKPOINT_FILE)


def link_or_copy(source: str, target: str) -> str:
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
    """A run's reported checkpoints, made in ``work`` (a folder of the reporter's own): after
    each epoch a directory with that epoch's ``CHECKPOINT_FILE`` and, when an earlier epoch is
    the best so far, its ``BEST_FILE``. ``report(metrics, checkpoint=...)`` is ``ray.tune.report``
    by default; a Ray Train worker passes ``ray.train.report``, a test its own."""

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
        place = link_or_copy if newest == checkpoint_dir else copy_checkpoint
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
            current = link_or_copy(checkpoint_path, os.path.join(d, CHECKPOINT_FILE))
            if best_epoch == metrics["epoch"]:
                link_or_copy(current, self.best)
            else:
                link_or_copy(self.best, os.path.join(d, BEST_FILE))
            report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


# ---------------------------------------------------------------- on every worker


def stage_worker_loop(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the stage loop, reporting every epoch.

    ``loop_config``: ``train_config`` (TrainConfig fields), ``run_dir`` (rank 0's run folder, kept
    with every epoch's checkpoint, on storage every rank reads; None: a scratch folder, only the
    reported checkpoints are kept), ``train_run_dir`` (the Train run's own folder), ``tb_dir``
    and ``progress_dir`` (TensorBoard run and progress file, rank 0; None: the run folder's
    tb/, no progress file), ``tb_upload`` (a storage URI the TensorBoard run is copied to after
    every epoch, or None), ``measure_cost`` and ``log`` (progress lines on rank 0).
    """
    import ray.train
    import ray.train.torch

    from virface.config import TrainConfig
    from virface.cost import run_cost
    from virface.distributed import DistributedContext
    from virface.progress import write_progress
    from virface.stages import StageRun
    from virface.storage import TreeSync

    context = ray.train.get_context()
    # Ray Train has set up the process group; the stage loop only reads it.
    ctx = DistributedContext(ray.train.torch.get_device(), context.get_world_rank(), context.get_world_size())
    if loop_config.get("log"):
        if ctx.is_main:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        # Ray Train logs every report with all its metrics; rank 0's epoch line says the same.
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    train_config = dict(loop_config["train_config"])
    work = tempfile.mkdtemp(prefix=f"virface-rank{ctx.rank}-")
    epoch_name = {}

    def train_report(metrics, checkpoint=None):
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=epoch_name["name"])

    reported = ReportedCheckpoints(work, report=train_report)
    try:
        checkpoint = ray.train.get_checkpoint()
        run_dir = loop_config.get("run_dir")
        if checkpoint is not None:
            # Restarted after a failure, or a restored run: continue from the last reported epoch.
            with checkpoint.as_directory() as d:
                resume = reported.restore(d)
            train_config.update(resume_file=resume, pretrained_file=None)
            if ctx.is_main:
                log.info("%s: continuing from %s", train_config["method"], checkpoint.path)
        elif run_dir is not None:
            resume = last_epoch_of_this_run(loop_config["train_run_dir"], run_dir)
            if resume is not None:
                train_config.update(resume_file=resume, pretrained_file=None)
                if ctx.is_main:
                    log.info("%s: continuing from %s", train_config["method"], resume)
        keep = run_dir is not None
        if not ctx.is_main or run_dir is None:
            run_dir = os.path.join(work, "run")
        progress_dir = loop_config.get("progress_dir")
        on_progress = (lambda progress: write_progress(progress_dir, progress)) if progress_dir else None
        run = StageRun(TrainConfig.from_dict(train_config), run_dir, ctx=ctx,
                       tb_dir=loop_config.get("tb_dir") if ctx.is_main else None,
                       on_progress=on_progress, keep_epoch_checkpoints=keep)
        tb_sync = TreeSync(loop_config.get("tb_dir") or "", loop_config.get("tb_upload") if ctx.is_main else None)
        if ctx.is_main and run.best_ckpt and not os.path.exists(reported.best):
            # Resumed from the run folder (--resume_file): its best.pt is the best so far.
            link_or_copy(run.best_ckpt, reported.best)
        try:
            cost = run_cost(run) if loop_config.get("measure_cost") else {}
            while not run.done:
                metrics, path = run.run_epoch()
                metrics = {**metrics, **cost}
                epoch_name["name"] = f"checkpoint_epoch={metrics['epoch']:03d}"
                if ctx.is_main:
                    tb_sync.sync()          # the epoch's TensorBoard points, before it counts
                    reported.report(metrics, path, run.best["epoch"])
                else:               # every rank reports; rank 0 brings the checkpoint
                    train_report(metrics)
        finally:
            run.close()
            tb_sync.sync()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def last_epoch_of_this_run(train_run_dir: str, run_dir: str) -> str | None:
    """The run folder's checkpoint of the last epoch this Ray Train run reported, or None.

    Ray Train registers a report when its controller next polls the workers (every 2 s): a worker
    group that fails in between restarts without that checkpoint, or without any. Rank 0 had
    persisted it to the Train run's folder (``checkpoint_epoch=NNN``) and saved the same epoch in
    the run folder (atomically); a folder of this run's own, so no earlier run's epochs count.
    """
    if not os.path.isdir(train_run_dir):
        return None
    epochs = sorted(int(name.split("=", 1)[1]) for name in os.listdir(train_run_dir)
                    if name.startswith("checkpoint_epoch=") and name.split("=", 1)[1].isdigit())
    for epoch in reversed(epochs):
        path = os.path.join(run_dir, "checkpoints", f"epoch_{epoch:03d}.pt")
        if os.path.isfile(path):
            return path
    return None


# ---------------------------------------------------------------- the trainer


def stage_trainer(train_config: dict[str, Any], *, workers: int, cpus_per_worker: float,
                  gpus_per_worker: float, storage: str, name: str, max_failures: int,
                  run_dir: str | None = None, tb_dir: str | None = None, progress_dir: str | None = None,
                  tb_upload: str | None = None, measure_cost: bool = False, log: bool = False,
                  callbacks: list | None = None):
    """A ``TorchTrainer`` running ``train_config``'s stage on ``workers`` ranks.

    ``storage`` (absolute, or a storage URI) / ``name`` is the Train run's folder: its reported checkpoints
    (``checkpoint_epoch=NNN``, the ``CHECKPOINTS_KEPT`` latest) and the snapshot a trainer of
    the same name and storage restores from. A worker that fails restarts the group from the
    last checkpoint, ``max_failures`` times. See :func:`stage_worker_loop` for the rest.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from virface import storage as storages

    check_train_v2()
    if not (os.path.isabs(storage) or storages.is_uri(storage)):
        raise ValueError(f"Ray Train storage {storage!r} must be absolute")
    use_gpu = gpus_per_worker > 0
    per_worker = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        stage_worker_loop,
        train_loop_config={"train_config": train_config, "run_dir": run_dir, "tb_dir": tb_dir,
                           "progress_dir": progress_dir, "tb_upload": tb_upload,
                           "measure_cost": measure_cost, "log": log,
                           "train_run_dir": storages.join(storage, name)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=callbacks or [],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            failure_config=ray.train.FailureConfig(max_failures=max_failures,
                                                   controller_failure_limit=CONTROLLER_FAILURE_LIMIT)),
    )


def check_train_v2() -> None:
    """This module uses Ray Train's V2 API (on by default in Ray 2.60): the trainer runs inside a
    Tune function trainable and reports through ``TuneReportCallback``, which V1 lacks."""
    from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled

    if not is_v2_enabled():
        raise ConfigError(f"{V2_ENABLED_ENV_VAR}={os.environ.get(V2_ENABLED_ENV_VAR)!r} turns Ray Train's V2 "
                          f"API off; VirFace's multi-worker runs need it: unset the variable or set it to 1")


def workers_beyond_cluster(workers: int, cpus_per_worker: float, gpus_per_worker: float,
                           cluster: dict[str, float]) -> str | None:
    """Why a worker group the cluster (``ray.cluster_resources()``) can never hold does not fit,
    or None when it fits (Ray would otherwise wait for the resources without a limit)."""
    need = {"CPU": workers * cpus_per_worker, "GPU": workers * gpus_per_worker}
    if all(v <= cluster.get(k, 0.0) + 1e-9 for k, v in need.items()):
        return None
    return (f"{workers} worker(s) x ({cpus_per_worker} CPU, {gpus_per_worker} GPU) = {need}, but the "
            f"Ray cluster has {{'CPU': {cluster.get('CPU', 0)}, 'GPU': {cluster.get('GPU', 0)}}}; "
            f"lower --workers/--cpus_per_worker/--gpus_per_worker or add nodes")


def check_workers_fit(workers: int, cpus_per_worker: float, gpus_per_worker: float,
                      cluster: dict[str, float]) -> None:
    """A worker group the cluster can never hold is an error now, not a group waiting for resources."""
    why = workers_beyond_cluster(workers, cpus_per_worker, gpus_per_worker, cluster)
    if why:
        raise ConfigError(why)


def user_code_runtime_env(archs) -> dict | None:
    """Ray's job-level ``runtime_env`` that ships the user's architecture modules (``--arch
    module.path:callable``) to every worker of the job, or None when there is nothing to ship.

    A worker imports the module itself (it builds the model); on another node, or on a cluster
    started before the module's folder was on its PYTHONPATH, it would not find it. Ray uploads
    the module's top-level package (or its one file) with the job. A module installed in
    site-packages is the cluster's environment's to provide, as virface itself is."""
    import importlib
    import site
    import sysconfig

    installed = [os.path.realpath(p) for p in {*site.getsitepackages(), site.getusersitepackages(),
                                               sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}]
    modules, seen = [], set()
    for arch in archs:
        if not isinstance(arch, str) or ":" not in arch:
            continue
        top = arch.partition(":")[0].split(".")[0]
        if top in seen or top == __name__.partition(".")[0]:     # this package: installed with the cluster
            continue
        seen.add(top)
        module = importlib.import_module(top)          # checked importable before (check_arch)
        where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), None)
        if where is None or any(os.path.realpath(where).startswith(p + os.sep) for p in installed):
            continue
        modules.append(module)
    return {"py_modules": modules} if modules else None


def run_archs(config) -> list[str | None]:
    """The backbones a run of ``config`` may build: its arch, and the one of the checkpoint it
    starts from (a later stage, or a resume, inherits that)."""
    start = config.resume_file or config.pretrained_file
    return [config.arch, *([(load_checkpoint(start).get("model") or {}).get("arch")] if start else [])]


def init_local_ray(num_cpus: float, num_gpus: float, log_to_driver: bool = True,
                   runtime_env: dict | None = None) -> None:
    """``ray.init`` of a Ray of this process's own, with explicit resources, listening on
    loopback only, with the dashboard: Ray Train's clean-up of a run's placement groups asks the
    dashboard's state API. Every process of this Ray (whichever job it serves) is told the
    dashboard's address; otherwise the clean-up guesses it, and fails when several Ray instances
    run on the machine."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Ray's processes inherit the environment of the process that starts them: set for the
    # start only.
    saved = os.environ.get(API_SERVER_ADDRESS)
    os.environ[API_SERVER_ADDRESS] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=port, _node_ip_address="127.0.0.1",
                 log_to_driver=log_to_driver, logging_level=logging.WARNING, runtime_env=runtime_env)
    finally:
        if saved is None:
            os.environ.pop(API_SERVER_ADDRESS, None)
        else:
            os.environ[API_SERVER_ADDRESS] = saved


@contextlib.contextmanager
def ray_cluster(address: str | None, log_to_driver: bool = True, runtime_env: dict | None = None):
    """Connect to ``address`` (or ``$RAY_ADDRESS``); else start a local Ray with this machine's
    CPUs and GPUs (:func:`init_local_ray`). Either way disconnect (and stop the local Ray)
    on the way out. ``runtime_env``: the job's (:func:`user_code_runtime_env`)."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster on loopback (a test, a laptop) has its raylet there too, not on the
        # machine's network address, which Ray would otherwise assume for this driver.
        local = address.split("://")[-1].startswith(("127.", "localhost"))
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING,
                 runtime_env=runtime_env, **({"_node_ip_address": "127.0.0.1"} if local else {}))
    else:
        import torch

        init_local_ray(os.cpu_count() or 1, torch.cuda.device_count(), log_to_driver, runtime_env)
    try:
        yield
    finally:
        ray.shutdown()


def train_data_parallel(config, *, workers: int, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                        address: str | None = None, max_failures: int = 1):
    """``virface-train --workers N``: ``config``'s stage on ``workers`` Ray Train ranks, writing
    the same run folder (``config.snapshot_prefix``) as a one-process run: every epoch's
    checkpoint, best.pt, metrics.jsonl, tb/. A ``config.resume_file`` continues that run, as in
    one process. Ray Train's own copies of the reported checkpoints (what it restarts a failed
    group from) live in the run folder's ``ray_train/`` while it runs and are removed when it
    succeeds. Returns a :class:`virface.stages.StageResult` read from the run folder."""
    import ray

    run_dir = os.path.abspath(config.snapshot_prefix)
    with ray_cluster(address, runtime_env=user_code_runtime_env(run_archs(config))):
        check_workers_fit(workers, cpus_per_worker, gpus_per_worker, ray.cluster_resources())
        storage = os.path.join(run_dir, "ray_train")
        trainer = stage_trainer(config.to_dict(), workers=workers, cpus_per_worker=cpus_per_worker,
                                gpus_per_worker=gpus_per_worker, storage=storage,
                                # A new name per invocation: Train never continues an earlier
                                # run by itself; --resume_file says which epoch to continue.
                                name=f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                max_failures=max_failures, run_dir=run_dir, log=True)
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise VirFaceError(f"{config.method} on {workers} Ray Train workers failed (the run folder "
                               f"{run_dir} keeps every finished epoch; --resume_file continues it): "
                               f"{_last_line(exc)}") from exc
    shutil.rmtree(storage, ignore_errors=True)
    return read_run_result(run_dir)


def _last_line(exc: BaseException) -> str:
    """The innermost error's message: a worker's exception arrives wrapped by Ray Train."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def read_run_result(run_dir: str):
    """A finished run's :class:`virface.stages.StageResult`, from its folder."""
    from virface.stages import StageResult

    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        history = [json.loads(line) for line in f if line.strip()]
    last = history[-1]["epoch"] if history else None
    last_ckpt = os.path.join(run_dir, "checkpoints", f"epoch_{last:03d}.pt") if last else None
    best_ckpt = os.path.join(run_dir, "best.pt")
    best_ckpt = best_ckpt if os.path.isfile(best_ckpt) else None
    best = dict(load_checkpoint(best_ckpt).get("best") or {}) if best_ckpt else {}
    return StageResult(history, run_dir, last_ckpt, best_ckpt, best)
