"""The stage loop, one plain function for every stage: ``run_stage(config, run_dir, data, ...)``.

It runs alone on CPU or CUDA, inside Ray Train workers, and inside a Tune trial, unchanged: it
sets up no process group (it asks ``DistributedContext`` whether one exists), binds no port, and
reports each epoch through a callback. What differs between stages comes from the stage table
(``virface.stage_table``); each stage's step is in ``virface.steps``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from virface.fileio import write_text_atomic
from virface.checkpoint import (check_resume, checkpoint_state, copy_checkpoint, inherit_model_fields,
                                load_models, read_start_checkpoint, save_checkpoint)
from virface.config import TEST_PREFIX, TrainConfig
from virface.data.loading import StageData, build_stage_data, make_train_loader
from virface.data.prefetch import DevicePrefetcher
from virface.distributed import DistributedContext
from virface.errors import ConfigError, DataError, NonFiniteLossError, NonFiniteWeightsError, VirFaceError
from virface.evaluation.verification import evaluate_pair_sets
from virface.metrics import selection_metric, tensorboard_tag
from virface.models import StageModels, build_models, build_optimizers
from virface.partial_fc import full_optimizer_state, load_optimizer_state
from virface.progress import EvalClock, EvalProgress, RunClock, StepProgress
from virface.selection import RuleTracker, parse_rule
from virface.stage_table import stage_spec
from virface.instance_diagnostics import build_instance_sampler
from virface.steps import StageStep

log = logging.getLogger("virface")

EpochCallback = Callable[[dict[str, Any], "str | None"], None]
ProgressCallback = Callable[["StepProgress | EvalProgress"], None]
DEFAULT_ARCH_REAL, DEFAULT_ARCH_SYNTHETIC = "resnet50", "mobilefacenet_s"
DEFAULT_FEAT_LEN = 512
NONFINITE_CHECK_EVERY = 25   # steps between host syncs that look for a NaN/inf loss


@dataclass
class StageResult:
    history: list[dict[str, Any]]
    run_dir: str
    last_checkpoint: str | None
    best_checkpoint: str | None
    best: dict[str, Any] = field(default_factory=dict)


def finalise_config(config: TrainConfig, data: StageData) -> TrainConfig:
    arch = config.arch or (DEFAULT_ARCH_SYNTHETIC if config.uses_synthetic else DEFAULT_ARCH_REAL)
    num_ids = data.labeled.num_classes
    if config.num_ids is not None and config.num_ids != num_ids:
        raise ConfigError(f"num_ids: {config.num_ids} (from the config or the start checkpoint), but "
                          f"the labeled data {data.labeled.name} has {num_ids} identities")
    generator = ({"gen_residual": bool(config.gen_residual), "gen_target": config.gen_target or "class_centre"}
                 if stage_spec(config.method).builds_generator else {})
    return config.replace(arch=arch, num_ids=num_ids, input_size=data.input_size,
                          feat_len=config.feat_len or DEFAULT_FEAT_LEN, **generator)


def loss_selects_best(config: TrainConfig) -> bool:
    """Whether best.pt will follow the training loss for want of validation pair sets: real data
    without --val, or evaluation off, in a stage that selects on verification by default."""
    spec = stage_spec(config.method)
    if config.best_metric or spec.default_metric or not spec.trains_backbone:
        return False
    return not config.eval or (not config.uses_synthetic and not config.val)


# ---------------------------------------------------------------- evaluation and logging


class RunLog:
    """metrics.jsonl and TensorBoard for rank 0; other ranks get a RunLog that writes nothing."""

    def __init__(self, run_dir: str, tb_dir: str | None, enabled: bool, tensorboard: bool,
                 resume_epoch: int | None, resume_metrics: dict[str, Any] | None = None):
        self.enabled = enabled
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        if resume_epoch is not None:
            self._truncate_after(resume_epoch, resume_metrics)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tb_dir or os.path.join(run_dir, "tb"))

    def _truncate_after(self, epoch: int, metrics: dict[str, Any] | None = None) -> None:
        """A resumed run repeats the epochs after its checkpoint: keep the lines up to ``epoch``.
        A line cut short by a crash (no newline, not JSON) is dropped with them. The resumed
        epoch's own line, lost when the run stopped between saving its checkpoint and writing the
        line (a full disk at best.pt), is written from the checkpoint's ``metrics``."""
        kept, epochs = [], set()
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line) if line.endswith("\n") else None
                    except ValueError:
                        record = None
                    if isinstance(record, dict) and record.get("epoch", 0) <= epoch:
                        kept.append(line)
                        epochs.add(record.get("epoch"))
        if metrics and metrics.get("epoch") == epoch and epoch not in epochs:
            log.warning("%s: epoch %d's line was missing; written from its checkpoint", self.metrics_path, epoch)
            kept.append(json.dumps(metrics) + "\n")
        if kept or os.path.exists(self.metrics_path):
            write_text_atomic(self.metrics_path, "".join(kept))

    def epoch(self, metrics: dict[str, Any], pair_set_names: list[str]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is None:
            return
        step = metrics["epoch"]
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(tensorboard_tag(key), value, step)
        rows = [f"| {n} | {metrics[n + '_acc']:.4f} ± {metrics[n + '_acc_se']:.4f} | "
                f"{metrics[n + '_acc_std']:.4f} | {metrics[n + '_tar_far1e-3']:.4f} |"
                for n in pair_set_names if n + "_acc" in metrics]
        if rows:
            self.writer.add_text("verification", "| set | acc ± SE (over pairs) | 10-fold std | "
                                 "TAR@FAR=1e-3 |\n|---|---|---|---|\n" + "\n".join(rows), step)
        self.writer.flush()

    def step(self, global_step: int, progress: StepProgress) -> None:
        """Per-step points, every ``log_every`` steps (the x axis counts steps, not epochs)."""
        if self.writer is not None:
            self.writer.add_scalar("step/loss", progress.loss, global_step)
            self.writer.add_scalar("step/samples_per_s", progress.samples_per_s, global_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def forget_abandoned_epochs(run_dir: str, resumed_epoch: int, best: dict[str, Any],
                            resume_file: str) -> str | None:
    """A run resumed after epoch E drops what its abandoned later epochs left (checkpoints after
    E; metrics lines are cut by RunLog) and rebuilds best.pt from epochs 1..E. Returns best.pt's
    path, or None when no checkpoint of the best epoch is left to rebuild it from."""
    folder = os.path.join(run_dir, "checkpoints")
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith("epoch_") and name.endswith(".pt") and int(name[6:-3]) > resumed_epoch:
            os.unlink(os.path.join(folder, name))
    best_path = os.path.join(run_dir, "best.pt")
    source = os.path.join(folder, f"epoch_{best.get('epoch', 0):03d}.pt")
    if best.get("epoch") == resumed_epoch:
        source = resume_file
    if best and os.path.isfile(source):
        if os.path.abspath(source) != os.path.abspath(best_path):
            return copy_checkpoint(source, best_path)
        return best_path
    if os.path.exists(best_path):
        # best.pt may come from an abandoned epoch; without the best epoch's file, drop it.
        log.warning("%s: removed best.pt: the checkpoint of the resumed run's best epoch %s is gone",
                    run_dir, best.get("epoch"))
        os.unlink(best_path)
    return None


def check_run_dir(run_dir: str, resuming: bool) -> None:
    """Never write into an earlier run's folder unless resuming it."""
    if resuming or not os.path.isdir(run_dir):
        return
    checkpoints = os.path.join(run_dir, "checkpoints")
    if (os.path.exists(os.path.join(run_dir, "metrics.jsonl")) or os.path.exists(os.path.join(run_dir, "best.pt"))
            or (os.path.isdir(checkpoints) and os.listdir(checkpoints))):
        raise VirFaceError(f"run folder {run_dir} already holds a run; choose another "
                           f"--snapshot_prefix, delete it, or resume with --resume_file")


# ---------------------------------------------------------------- the loop


class StageRun:
    """One stage run, an epoch at a time: ``StageRun(...)`` sets everything up (checkpoint, data,
    models, optimisers, loader, logs), each ``run_epoch()`` trains, evaluates and saves one epoch,
    ``close()`` ends the logs. :func:`run_stage` drives it to the end; a one-worker search trial
    (virface.search.trial) and each Ray Train worker (virface.ray_train) drive it epoch by epoch,
    reporting after each.

    ``run_dir`` gets checkpoints/epoch_NNN.pt, best.pt, metrics.jsonl and tb/ (rank 0 only).
    ``on_progress(StepProgress)`` is called on rank 0 every ``config.log_every`` steps, and
    ``on_progress(EvalProgress)`` after each pair set is scored (default: a log line; neither
    with ``log_every`` 0). ``data`` defaults to what ``config`` names.
    """

    def __init__(self, config: TrainConfig, run_dir: str, data: StageData | None = None, *,
                 ctx: DistributedContext | None = None, on_progress: ProgressCallback | None = None,
                 tb_dir: str | None = None, keep_epoch_checkpoints: bool = True):
        ctx = ctx or DistributedContext.current(config.device)
        run_dir = os.path.abspath(run_dir)
        state, start_path = read_start_checkpoint(config)
        resuming = config.resume_file is not None
        if resuming:
            check_resume(config, state, start_path, run_dir)
        if ctx.is_main:
            check_run_dir(run_dir, resuming)
        config = inherit_model_fields(config, state, start_path)
        spec = stage_spec(config.method)
        if ctx.is_main and loss_selects_best(config):
            log.warning("%s: %s: best.pt will be the epoch with the lowest training loss, not the best "
                        "verification accuracy (give --val NAME=PATH, or --best_metric)", config.method,
                        "evaluation is off (--no-eval)" if not config.eval else "no validation pair sets (--val)")
        if data is None:
            if ctx.is_main:
                log.info("%s: reading the data (%s)", config.method,
                         "built-in synthetic faces" if config.uses_synthetic else config.labeled)
            data = build_stage_data(config)
        if not config.uses_unlabeled:
            data = dataclasses.replace(data, unlabeled=None)
        elif data.unlabeled is None or len(data.unlabeled) == 0:
            raise DataError(f"stage {config.method} needs unlabeled data, and none was given")
        config = finalise_config(config, data)

        torch.manual_seed(config.seed)
        models = build_models(config, ctx)
        if ctx.is_main:
            log.info("%s: %d labeled images of %d identities%s; pair sets %s; %s (%.2fM parameters) "
                     "at %d px on %s x %d", config.method, len(data.labeled), data.labeled.num_classes,
                     f", {len(data.unlabeled)} unlabeled" if data.unlabeled is not None else "",
                     list(data.pair_sets) or "none", config.arch,
                     sum(p.numel() for p in models.backbone.parameters()) / 1e6, config.input_size,
                     ctx.device, ctx.world_size)
        if state is not None:
            load_models(models, state, start_path)
        for module in models.modules():
            module.to(ctx.device)
        optimizers = build_optimizers(config, models)
        schedulers = {name: torch.optim.lr_scheduler.MultiStepLR(opt, list(config.decay_steps), config.gamma)
                      for name, opt in optimizers.items()}
        self.epoch, self.best, resumed_metrics = 0, {}, None
        if resuming:
            for name, opt in optimizers.items():
                load_optimizer_state(opt, state["optimizers"][name], models.head, ctx)
                schedulers[name].load_state_dict(state["schedulers"][name])
            self.epoch = int(state["epoch"])
            self.best = dict(state.get("best") or {})
            resumed_metrics = state.get("metrics")
        del state

        # A stage that freezes the backbone (generator) would only repeat the upstream's scores.
        self.pair_set_names = list(data.pair_sets) if config.eval and spec.trains_backbone else []
        self.metric_name, self.metric_mode = selection_metric(config.method, self.pair_set_names,
                                                              config.eval, config.best_metric)
        if self.best.get("metric") not in (None, self.metric_name):
            raise ConfigError(f"best_metric: the resumed run tracked {self.best['metric']!r}, not "
                              f"{self.metric_name!r}")
        self.rule = RuleTracker.from_state(parse_rule(config.selection), self.metric_name,
                                           self.metric_mode, self.best)

        backbone = models.backbone
        if config.channels_last and ctx.device.type == "cuda":
            backbone.to(memory_format=torch.channels_last)
        if ctx.is_distributed and spec.trains_backbone:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            backbone = nn.parallel.DistributedDataParallel(backbone, device_ids=device_ids)
        if config.compile:
            # Training forward only; evaluation runs the eager module (other batch shapes).
            backbone = torch.compile(backbone)
        scaler = (torch.amp.GradScaler("cuda") if config.amp == "fp16" and ctx.device.type == "cuda" else None)
        self.step_fn = StageStep(config, models, backbone, optimizers, ctx, scaler)
        self.config, self.data, self.ctx, self.models = config, data, ctx, models
        self._set_up_instances(spec, state_loaded=start_path is not None, resuming=resuming,
                               start_path=start_path)
        self.loader, self.sampler = make_train_loader(data, config, ctx.rank, ctx.world_size)

        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        if ctx.is_main:
            # A resumed run's too: what it trains with now (it may change RESUME_MAY_CHANGE).
            write_text_atomic(os.path.join(run_dir, "config.json"), json.dumps(config.to_dict(), indent=2))
        self.run_log = RunLog(run_dir, tb_dir, ctx.is_main, config.tensorboard,
                              self.epoch if resuming else None, resumed_metrics)
        self.history: list[dict[str, Any]] = []
        self.last_ckpt: str | None = None
        self.best_ckpt: str | None = None
        if resuming and ctx.is_main:
            self.best_ckpt = forget_abandoned_epochs(run_dir, self.epoch, self.best, config.resume_file)
        self.clock = RunClock(config.method, config.max_epoch)
        if on_progress is None:
            def on_progress(progress: StepProgress | EvalProgress) -> None:
                log.info("%s", progress.line())
        self.on_progress = on_progress
        self.config, self.run_dir, self.data, self.ctx = config, run_dir, data, ctx
        self.models, self.optimizers, self.schedulers = models, optimizers, schedulers
        self.keep_epoch_checkpoints = keep_epoch_checkpoints

    def _set_up_instances(self, spec, state_loaded: bool, resuming: bool, start_path: str | None) -> None:
        """What the generator and virface stages add: the sampler of the instances, the
        same_identity generator's bank, the diagnostics' pairs, and (virface, on a fresh start)
        the gate's figures of the generator it loaded."""
        config, ctx, models, data = self.config, self.ctx, self.models, self.data
        from virface.instance_diagnostics import diagnostic_pairs, identity_gate, labeled_features

        if spec.needs_generator:
            self.step_fn.instance_sampler = build_instance_sampler(config, models, data, ctx.device)
            if config.generator_fixed and ctx.is_main:
                log.info("%s: instances drawn by %s, kept fixed (not the reference's); optim_mode, "
                         "vi_gen_grad and the generator's loss weights do not apply",
                         config.method, "covariance transfer" if config.vi_generator == "covariance"
                         else "the same_identity generator")
        elif spec.trains_generator and (config.gen_target == "same_identity" or config.gen_diversity > 0):
            self.step_fn.set_variation_bank(*labeled_features(models.backbone, data, config.variation_images,
                                                              ctx.device))
        self.diag_pairs = self.diag_features = None
        if spec.builds_generator and config.eval and config.diagnostic_pairs and ctx.is_main:
            self.diag_pairs = diagnostic_pairs(data, config.diagnostic_pairs)
            if self.diag_pairs is None:
                log.warning("%s: no same-identity pair to measure the instances on; no vi_* metrics",
                            config.method)
            else:
                log.info("%s: instance diagnostics on %s", config.method, self.diag_pairs.source)
        # Every rank: a sharded head's W is gathered (a collective).
        weight = self._full_weight() if spec.needs_generator and not resuming else None
        if weight is not None and self.diag_pairs is not None and state_loaded:
            drawn_by = "covariance transfer" if config.vi_generator == "covariance" else "its generator"
            identity_gate(self.instance_metrics(weight), f"{start_path} ({drawn_by})", go_on=True,
                          where=f"{config.method} starts from ")

    def _full_weight(self) -> torch.Tensor:
        head = self.models.head
        return getattr(head, "full_state_dict", head.state_dict)()["weight"]

    def instance_metrics(self, weight: torch.Tensor) -> dict[str, float]:
        """The vi_* diagnostics (virface.instance_diagnostics) of the stage's instance sampler
        now, on rank 0's diagnostic pairs; a frozen backbone's features are taken once."""
        from virface.instance_diagnostics import measure_instances, pair_features

        features = self.diag_features
        if features is None:
            features = pair_features(self.models.backbone, self.diag_pairs, self.ctx.device)
            if not stage_spec(self.config.method).trains_backbone:
                self.diag_features = features
        return measure_instances(self.step_fn.instance_sampler.sample, *features, weight.to(self.ctx.device),
                                 self.config.gen_num, self.config.unlabel_batch_size, self.config.seed)

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.max_epoch

    def run_epoch(self) -> tuple[dict[str, Any], str | None]:
        """Train, evaluate and save the next epoch; ``(metrics, checkpoint path)``, the path None
        on ranks other than 0. Every rank must call it."""
        config, ctx, models = self.config, self.ctx, self.models
        epoch = self.epoch = self.epoch + 1
        # Seeded per epoch (augmentation, dropout, the generator's draws): a run resumed after
        # epoch E trains epoch E + 1 exactly as the uninterrupted run did.
        torch.manual_seed(config.seed * 1000 + ctx.rank + epoch)
        report = ProgressReport(config, self.clock, epoch, self.run_log,
                                self.on_progress if ctx.is_main else None)
        metrics = train_one_epoch(config, models, self.step_fn, self.loader, self.sampler, epoch, ctx,
                                  self.optimizers, report)
        for sched in self.schedulers.values():
            sched.step()
        # Every rank: a sharded head gathers its W (and W's optimiser state) for the checkpoint.
        head_state = getattr(models.head, "full_state_dict", models.head.state_dict)()
        if self.diag_pairs is not None:
            metrics.update(self.instance_metrics(head_state["weight"]))
        if self.pair_set_names and ctx.is_main:
            eval_start = time.perf_counter()
            metrics.update(self.evaluate(epoch))
            self.clock.eval_s = time.perf_counter() - eval_start
        metrics = ctx.broadcast_object(metrics)
        name = self.metric_name
        if name not in metrics:
            raise ConfigError(f"best_metric: {name!r} is not among this stage's metrics {sorted(metrics)}")
        # best_<metric>: the run's value so far under its selection rule (what a search reads).
        is_best, metrics["best_" + name] = self.rule.update(metrics[name], epoch)
        self.best = best = self.rule.state()
        ckpt_path = None
        optimizer_states = {k: full_optimizer_state(o, models.head, ctx) for k, o in self.optimizers.items()}
        if ctx.is_main:
            ckpt_path = os.path.join(self.run_dir, "checkpoints", f"epoch_{epoch:03d}.pt")
            save_checkpoint(checkpoint_state(config, models, self.optimizers, self.schedulers, epoch,
                                             metrics, best, self.run_dir, head_state, optimizer_states),
                            ckpt_path)
            if is_best:
                self.best_ckpt = copy_checkpoint(ckpt_path, os.path.join(self.run_dir, "best.pt"))
            if self.last_ckpt and not self.keep_epoch_checkpoints:
                os.unlink(self.last_ckpt)
            self.run_log.epoch(metrics, self.pair_set_names)
            log.info("%s epoch %d/%d %s", config.method, epoch, config.max_epoch, format_metrics(metrics))
        self.last_ckpt = ckpt_path
        self.history.append(metrics)
        return metrics, ckpt_path

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Score the validation pair sets, then the test ones (reported every epoch, never
        selected on), one set at a time with an EvalProgress to ``on_progress`` after each (a
        large set takes minutes on a CPU: the run says where it is)."""
        config = self.config
        sets = [("", name, ps) for name, ps in self.data.pair_sets.items()]
        sets += [(TEST_PREFIX, name, ps) for name, ps in (self.data.test_pair_sets or {}).items()]
        clock = EvalClock(config.method, epoch, config.max_epoch,
                          {prefix + name: len(ps.issame) for prefix, name, ps in sets})
        metrics: dict[str, float] = {}
        for prefix, name, pair_set in sets:
            start = time.perf_counter()
            metrics.update(evaluate_pair_sets(self.models.backbone, {name: pair_set}, self.ctx.device,
                                              prefix=prefix))
            progress = clock.record(prefix + name, time.perf_counter() - start)
            if config.log_every:
                self.on_progress(progress)
        return metrics

    def close(self) -> None:
        self.run_log.close()

    def result(self) -> StageResult:
        return StageResult(self.history, self.run_dir, self.last_ckpt, self.best_ckpt, self.best)


def run_stage(config: TrainConfig, run_dir: str, data: StageData | None = None, *,
              ctx: DistributedContext | None = None, on_epoch_end: EpochCallback | None = None,
              on_progress: ProgressCallback | None = None, tb_dir: str | None = None,
              keep_epoch_checkpoints: bool = True) -> StageResult:
    """Train one stage for epochs (start..config.max_epoch] and return its history and checkpoints
    (see :class:`StageRun`). ``on_epoch_end(metrics, checkpoint_path)`` is called on every rank
    after each epoch; the path is None on ranks other than 0."""
    run = StageRun(config, run_dir, data, ctx=ctx, on_progress=on_progress, tb_dir=tb_dir,
                   keep_epoch_checkpoints=keep_epoch_checkpoints)
    try:
        while not run.done:
            metrics, checkpoint = run.run_epoch()
            if on_epoch_end is not None:
                on_epoch_end(metrics, checkpoint)
    finally:
        run.close()
    return run.result()


class ProgressReport:
    """Every ``log_every`` steps of an epoch: one host sync for the loss, a StepProgress to the
    callback and per-step TensorBoard points (rank 0 only)."""

    def __init__(self, config: TrainConfig, clock: RunClock, epoch: int, run_log: "RunLog",
                 callback: ProgressCallback | None):
        self.every = config.log_every if callback is not None else 0
        self.clock, self.epoch, self.run_log, self.callback = clock, epoch, run_log, callback

    def __call__(self, step: int, steps: int, loss: torch.Tensor, elapsed_s: float, samples: int) -> None:
        if not self.every or (step % self.every and step != steps):
            return
        progress = self.clock.progress(self.epoch, step, steps, elapsed_s, float(loss.detach()), samples)
        self.run_log.step((self.epoch - 1) * steps + step, progress)
        self.callback(progress)


def train_one_epoch(config: TrainConfig, models: StageModels, step_fn: StageStep, loader, sampler,
                    epoch: int, ctx: DistributedContext, optimizers,
                    report: ProgressReport | None = None) -> dict[str, Any]:
    trains = stage_spec(config.method).trains
    for part in ("backbone", "head", "generator"):
        module = getattr(models, part)
        if module is not None:
            module.train(part in trains)       # frozen parts run in eval mode (BatchNorm stats)
    sampler.set_epoch(epoch)
    lr = optimizers["main" if "main" in optimizers else "generator"].param_groups[0]["lr"]
    sums: dict[str, torch.Tensor] = {}
    pending: list[torch.Tensor] = []
    n_images, skipped, steps = 0, 0, 0
    n_steps = len(loader)
    start = time.perf_counter()
    for step, (images, labels, n_skipped) in enumerate(DevicePrefetcher(loader, ctx.device), start=1):
        step_fn.epochs_done = (epoch - 1) + (step - 1) / max(n_steps, 1)
        terms = step_fn(images, labels)
        pending.append(terms["loss"].detach())
        for key, value in terms.items():
            value = value.detach()
            sums[key] = sums[key] + value if key in sums else value.clone()
        if len(pending) >= NONFINITE_CHECK_EVERY:
            _check_finite(pending, config.method, epoch, step - len(pending) + 1)
            pending = []
        n_images += images.shape[0]
        skipped += n_skipped
        steps = step
        if report is not None:
            report(step, n_steps, terms["loss"], time.perf_counter() - start, n_images * ctx.world_size)
    _check_finite(pending, config.method, epoch, steps - len(pending) + 1)
    check_finite_weights(models, config.method, epoch, ctx)
    elapsed = time.perf_counter() - start
    keys = sorted(sums)
    # Collectives on the device: NCCL reduces CUDA tensors only.
    totals = (ctx.sum(torch.stack([sums[k].float() for k in keys])) / max(steps, 1) / ctx.world_size).cpu()
    counts = ctx.sum(torch.tensor([float(n_images), float(skipped)], device=ctx.device)).cpu()
    metrics: dict[str, Any] = {"epoch": epoch}
    metrics.update({k: float(v) for k, v in zip(keys, totals)})
    metrics.update({"lr": lr, "steps": steps, "samples_per_s": float(counts[0]) / max(elapsed, 1e-9),
                    "skipped_images": int(counts[1]), "epoch_time_s": elapsed})
    if skipped and ctx.is_main:
        log.warning("%s epoch %d: skipped %d corrupt image(s) on rank 0 (--strict-data raises instead)",
                    config.method, epoch, skipped)
    return metrics


def check_finite_weights(models: StageModels, stage: str, epoch: int,
                         ctx: DistributedContext | None = None) -> None:
    """Weights can overflow while the loss stays finite (a huge lr): check every parameter and
    buffer after each epoch, before anything is evaluated or saved. A collective: a sharded
    head's bad shard is on one rank only, and every rank must stop."""
    bad = None
    for part in ("backbone", "head", "generator"):
        module = getattr(models, part)
        if module is None:
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = bad or f"{part} {name}"
    if ctx is not None and ctx.is_distributed:
        flag = ctx.sum(torch.tensor([float(bad is not None)], device=ctx.device))
        if bad is None and float(flag) > 0:
            bad = "a tensor on another rank"
    if bad is not None:
        raise NonFiniteWeightsError(
            f"stage {stage}, epoch {epoch}: {bad} holds inf or NaN after training; stopping "
            f"before any checkpoint of these weights is written (lower lr, or check the data)")


def _check_finite(losses: list[torch.Tensor], stage: str, epoch: int, first_step: int) -> None:
    if not losses:
        return
    values = torch.stack(losses)
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        k = int(bad[0])
        raise NonFiniteLossError(f"stage {stage}, epoch {epoch}, step {first_step + k}: loss is "
                                 f"{float(values[k])}; stopping before any checkpoint of these weights "
                                 f"is written (lower lr, or check the data)")


def format_metrics(metrics: dict[str, Any]) -> str:
    """One log line: loss, lr, throughput, each pair set's accuracy ± its SE over pairs and the
    virtual instances' main diagnostics."""
    keys = [k for k in metrics if k.endswith("_acc") or k in ("loss", "samples_per_s", "lr", "vi_identity_keep",
                                                              "vi_draw_cos", "vi_real_cos")]

    def shown(key: str) -> str:
        se = metrics.get(key + "_se")
        return f"{key}={metrics[key]:.4g}" + (f"±{se:.2g}" if se is not None else "")

    return " ".join(shown(k) for k in keys)
