"""The four VirFace stages as one plain function: ``run_stage(config, data, run_dir, ...)``.

It runs alone on CPU or CUDA, inside Ray Train workers, and inside a Tune trial, unchanged: it
sets up no process group (it asks ``DistributedContext`` whether one exists), binds no port, and
reports each epoch through a callback.

Per stage (x labeled features, u unlabeled features, W class weights, G the generator):
  pretrain   ArcFace CE on x                                   -> backbone + W
  generator  L2 * mse(G(x), W_y) + KL * kl, backbone frozen   -> G
  virclass   CE of x against [W; u] (u are negative classes)  -> backbone + W
  virface    virclass + CE of G's instances of u against [W; u.detach()]
             + the generator loss; ``alternate``: a G step then a backbone/W step with G frozen;
             ``joint``: one optimiser over everything (the reference code)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from virface.backbones import build_backbone
from virface.checkpoint import (MODEL_KEYS, check_stage_preconditions, load_checkpoint,
                                load_module_state, model_meta, save_checkpoint)
from virface.config import INHERITED_FIELDS, TrainConfig
from virface.data.loading import StageData, build_stage_data, make_train_loader
from virface.distributed import DistributedContext
from virface.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, VirFaceError
from virface.generator import FeatureVAE, generator_losses
from virface.heads import ArcFaceHead, overlap_keep_mask
from virface.progress import RunClock, StepProgress

log = logging.getLogger("virface")

EpochCallback = Callable[[dict[str, Any], "str | None"], None]
ProgressCallback = Callable[[StepProgress], None]
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


@dataclass
class StageModels:
    backbone: nn.Module
    head: ArcFaceHead
    generator: FeatureVAE | None = None


# ---------------------------------------------------------------- set-up


def read_start_checkpoint(config: TrainConfig) -> tuple[dict | None, str | None]:
    """Load the resume/pretrained checkpoint and check the stage can start from it.

    Runs before any data is read, so a wrong chain fails in a second, not after loading a data set.
    """
    path = config.resume_file or config.pretrained_file
    state = load_checkpoint(path) if path else None
    if config.resume_file:
        if state.get("stage") != config.method:
            raise CheckpointError(f"{path}: cannot resume stage {config.method} from a "
                                  f"{state.get('stage')} checkpoint; use --pretrained_file to start "
                                  f"a new stage from it")
    else:
        check_stage_preconditions(config.method, state, path)
    return state, path


def resolve_config(config: TrainConfig, state: dict | None, path: str | None) -> TrainConfig:
    """Fill the model-shaping fields from the start checkpoint; an explicit disagreement is an error."""
    if state is None:
        return config
    meta = model_meta(state, path)
    changes: dict[str, Any] = {}
    for key in INHERITED_FIELDS:
        given = getattr(config, key)
        if given is not None and given != meta[key]:
            raise ConfigError(f"{key}: {given!r} was given, but {path} was trained with "
                              f"{key}={meta[key]!r}; it is inherited from the checkpoint")
        changes[key] = meta[key]
    upstream_cfg = state.get("config") or {}
    # The head's classes are the upstream's labeled identities: the same data must come back.
    if config.uses_synthetic and not config.synthetic and upstream_cfg.get("synthetic"):
        changes["synthetic"] = upstream_cfg["synthetic"]
    return config.replace(**changes)


def finalise_config(config: TrainConfig, data: StageData) -> TrainConfig:
    arch = config.arch or (DEFAULT_ARCH_SYNTHETIC if config.uses_synthetic else DEFAULT_ARCH_REAL)
    num_ids = data.labeled.num_classes
    if config.num_ids is not None and config.num_ids != num_ids:
        raise ConfigError(f"num_ids: {config.num_ids} (from the config or the start checkpoint), but "
                          f"the labeled data {data.labeled.name} has {num_ids} identities")
    return config.replace(arch=arch, num_ids=num_ids, input_size=data.input_size,
                          feat_len=config.feat_len or DEFAULT_FEAT_LEN)


def build_models(config: TrainConfig) -> StageModels:
    backbone = build_backbone(config.arch, feat_len=config.feat_len, input_size=config.input_size)
    head = ArcFaceHead(config.num_ids, config.feat_len, s=config.s, m=config.m, dropout=config.dropout)
    generator = FeatureVAE(config.feat_len) if config.method in ("generator", "virface") else None
    return StageModels(backbone, head, generator)


def load_models(models: StageModels, state: dict, path: str, with_generator: bool) -> None:
    load_module_state(models.backbone, state["backbone"], "backbone", path)
    load_module_state(models.head, state["head"], "head", path)
    if with_generator and models.generator is not None and state.get("generator") is not None:
        load_module_state(models.generator, state["generator"], "generator", path)


def sgd(params_decay, params_no_decay, config: TrainConfig, lr: float) -> torch.optim.SGD:
    groups = [{"params": params_decay, "weight_decay": config.weight_decay},
              {"params": params_no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=config.momentum)


def split_decay(*modules: nn.Module) -> tuple[list, list]:
    """Weight decay on conv/linear weights and W; none on BatchNorm, PReLU and biases (1-d params)."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
    return decay, no_decay


def build_optimizers(config: TrainConfig, models: StageModels) -> dict[str, torch.optim.Optimizer]:
    g_lr = config.g_lr or config.lr
    method = config.method
    if method == "generator":
        return {"generator": sgd(*split_decay(models.generator), config, g_lr)}
    if method == "virface" and config.optim_mode == "joint":
        opt = sgd(*split_decay(models.backbone, models.head), config, config.lr)
        g_decay, g_no_decay = split_decay(models.generator)
        opt.add_param_group({"params": g_decay, "weight_decay": config.weight_decay, "lr": g_lr})
        opt.add_param_group({"params": g_no_decay, "weight_decay": 0.0, "lr": g_lr})
        return {"main": opt}
    optimizers = {"main": sgd(*split_decay(models.backbone, models.head), config, config.lr)}
    if method == "virface":
        optimizers["generator"] = sgd(*split_decay(models.generator), config, g_lr)
    return optimizers


# Verification sets from hardest to easiest on real data (CFP-FP's frontal-profile pairs and
# CPLFW's poses are the hard ones; LFW is near saturation): the default selection metric is the
# accuracy on the hardest set given. Names not listed rank after the hard ones, before the easy.
PAIR_SET_HARDNESS = ("cfp_fp", "cplfw", "agedb", "calfw", "vgg2_fp")
EASY_PAIR_SETS = ("cfp_ff", "lfw")
STAGE_LOSS_TERMS = {
    "pretrain": ("loss_arcface",),
    "generator": ("gen_mse", "gen_kl", "gen_loss"),
    "virclass": ("loss_vc", "virtual_classes", "overlap_dropped"),
    "virface": ("loss_vc", "loss_vi", "virtual_classes", "overlap_dropped", "gen_mse", "gen_kl",
                "gen_loss"),
}
EPOCH_METRICS = ("loss", "lr", "steps", "samples_per_s", "skipped_images", "epoch_time_s")
PAIR_SET_METRICS = ("acc", "acc_std", "tar_far1e-3")


def hardest_pair_set(names: list[str]) -> str:
    """The pair set whose accuracy selects by default: the first of PAIR_SET_HARDNESS found in a
    name, else a name not known to be easy, else the first given."""
    def rank(indexed: tuple[int, str]) -> tuple[int, int]:
        i, name = indexed
        lowered = name.lower()
        for k, token in enumerate(PAIR_SET_HARDNESS):
            if token in lowered:
                return k, i
        easy = [k for k, token in enumerate(EASY_PAIR_SETS) if token in lowered]
        return (len(PAIR_SET_HARDNESS) + 1 + easy[0], i) if easy else (len(PAIR_SET_HARDNESS), i)

    return min(enumerate(names), key=rank)[1]


def metric_mode(metric: str) -> str:
    """``min`` for losses, ``max`` for everything else (accuracies, TAR)."""
    return "min" if metric.endswith(("loss", "_mse", "_kl")) or metric.startswith("loss") else "max"


def stage_metric_names(method: str, pair_set_names: list[str]) -> list[str]:
    """Every per-epoch metric a stage reports (``best_<metric>`` aside) with these pair sets."""
    names = list(EPOCH_METRICS) + list(STAGE_LOSS_TERMS[method])
    if method != "generator":     # the generator stage freezes the backbone: nothing to verify
        names += [f"{ps}_{m}" for ps in pair_set_names for m in PAIR_SET_METRICS]
    return names


def selection_metric(method: str, pair_set_names: list[str], eval_on: bool = True,
                     best_metric: str | None = None) -> tuple[str, str]:
    """(metric, mode) that picks the best epoch, and by default a search's best trial: the
    hardest pair set's accuracy; gen_loss for the generator; the loss without pair sets."""
    if best_metric:
        return best_metric, metric_mode(best_metric)
    if method == "generator":
        return "gen_loss", "min"
    if eval_on and pair_set_names:
        return f"{hardest_pair_set(pair_set_names)}_acc", "max"
    return "loss", "min"


# ---------------------------------------------------------------- one step per stage


class StageStep:
    """One training step of a stage; returns the detached loss components of the step."""

    def __init__(self, config: TrainConfig, models: StageModels, backbone: nn.Module,
                 optimizers: dict[str, torch.optim.Optimizer], ctx: DistributedContext,
                 scaler: "torch.amp.GradScaler | None"):
        self.config, self.models, self.backbone = config, models, backbone
        self.optimizers, self.ctx, self.scaler = optimizers, ctx, scaler
        self.device = ctx.device
        amp = config.amp if self.device.type == "cuda" else "none"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.n_labeled = config.label_batch_size // ctx.world_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
        # Random horizontal flip, the reference's only augmentation at 112 px.
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            feats = self.backbone(x)
        return feats.float()

    def backward_step(self, loss: torch.Tensor, name: str, manual_params) -> None:
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self.ctx.average_gradients(manual_params)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def generator_terms(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        mse, kl = generator_losses(self.models.generator, x, self.models.head.weight[labels])
        return {"gen_mse": mse, "gen_kl": kl, "gen_loss": self.config.L2 * mse + self.config.KL * kl}

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        method, cfg = self.config.method, self.config
        labels = labels.to(self.device, non_blocking=True)
        head, gen = self.models.head, self.models.generator

        if method == "generator":
            with torch.no_grad():
                x = self.features(images)
            terms = self.generator_terms(x, labels)
            self.backward_step(terms["gen_loss"], "generator", gen.parameters())
            return {"loss": terms["gen_loss"], **terms}

        feats = self.features(images)
        if method == "pretrain":
            loss = F.cross_entropy(head(feats, labels), labels)
            self.backward_step(loss, "main", head.parameters())
            return {"loss": loss, "loss_arcface": loss}

        x, y = feats[:self.n_labeled], labels[:self.n_labeled]
        u_local = feats[self.n_labeled:]
        u_all = self.ctx.all_gather_with_grad(u_local)     # every rank's virtual classes
        if cfg.overlap_threshold is not None:
            keep = overlap_keep_mask(u_all, head.weight, cfg.s, cfg.overlap_threshold)
        else:
            keep = torch.ones(u_all.shape[0], dtype=torch.bool, device=u_all.device)
        centres = u_all[keep]
        loss_vc = F.cross_entropy(head.virclass(x, y, centres), y)
        out = {"loss_vc": loss_vc, "virtual_classes": keep.sum().float(),
               "overlap_dropped": (~keep).sum().float()}
        if method == "virclass":
            self.backward_step(loss_vc, "main", head.parameters())
            return {"loss": loss_vc, **out}

        # virface: VirInstance from this rank's kept unlabeled features.
        n_local = u_local.shape[0]
        local_keep = keep[self.ctx.rank * n_local:(self.ctx.rank + 1) * n_local]
        offset = int(keep[:self.ctx.rank * n_local].sum())
        sources = F.normalize(u_local[local_keep].detach(), dim=1)
        joint = cfg.optim_mode == "joint"
        if not joint:
            # Alternate: first a generator step on detached features (backbone frozen) ...
            terms = self.generator_terms(x, y)
            self.backward_step(terms["gen_loss"], "generator", gen.parameters())
        with torch.set_grad_enabled(joint):
            instances = gen.sample(sources, cfg.gen_num) if cfg.gen_num and len(sources) else None
        if instances is not None:
            logits_vi, target_vi = head.virinstance(instances, centres, cfg.gen_num, offset)
            loss_vi = F.cross_entropy(logits_vi, target_vi)
        else:
            loss_vi = feats.new_zeros(())
        if joint:
            terms = self.generator_terms(x, y)
            loss = loss_vc + loss_vi + terms["gen_loss"]
            self.backward_step(loss, "main", [*head.parameters(), *gen.parameters()])
        else:
            # ... then a backbone/W step with the generator frozen.
            self.backward_step(loss_vc + loss_vi, "main", head.parameters())
            loss = loss_vc + loss_vi + terms["gen_loss"].detach()
        return {"loss": loss, "loss_vi": loss_vi, **out, **terms}


# ---------------------------------------------------------------- evaluation and logging


def evaluate(backbone: nn.Module, data: StageData, ctx: DistributedContext, batch_size: int = 256
             ) -> dict[str, float]:
    from virface.evaluation.verification import evaluate_pair_set

    metrics: dict[str, float] = {}
    for name, pair_set in data.pair_sets.items():
        result = evaluate_pair_set(backbone, pair_set, device=ctx.device, batch_size=batch_size)
        metrics[f"{name}_acc"] = float(result.acc)
        metrics[f"{name}_acc_std"] = float(result.acc_std)
        metrics[f"{name}_tar_far1e-3"] = float(result.tar_at_far)
    return metrics


def tensorboard_tag(metric: str) -> str:
    """The TensorBoard tag of a per-epoch metric: loss/..., val/..., best/... or train/..."""
    if metric.startswith("best_"):
        return f"best/{metric[5:]}"
    if metric.startswith(("loss", "gen_")):
        return f"loss/{metric}"
    if metric.endswith(("_acc", "_acc_std", "_tar_far1e-3")):
        return f"val/{metric}"
    return f"train/{metric}"


class RunLog:
    """metrics.jsonl and TensorBoard for rank 0; other ranks get a RunLog that writes nothing."""

    def __init__(self, run_dir: str, tb_dir: str | None, enabled: bool, tensorboard: bool,
                 resume_epoch: int | None):
        self.enabled = enabled
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        if resume_epoch is not None:
            self._truncate_after(resume_epoch)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tb_dir or os.path.join(run_dir, "tb"))

    def _truncate_after(self, epoch: int) -> None:
        """A resumed run repeats the epochs after its checkpoint; drop their stale lines."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("epoch", 0) <= epoch]
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.metrics_path)

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
        rows = [f"| {n} | {metrics[n + '_acc']:.4f} ± {metrics[n + '_acc_std']:.4f} | "
                f"{metrics[n + '_tar_far1e-3']:.4f} |" for n in pair_set_names if n + "_acc" in metrics]
        if rows:
            self.writer.add_text("verification", "| set | acc | TAR@FAR=1e-3 |\n|---|---|---|\n"
                                 + "\n".join(rows), step)
        self.writer.flush()

    def step(self, global_step: int, progress: StepProgress) -> None:
        """Per-step points, every ``log_every`` steps (the x axis counts steps, not epochs)."""
        if self.writer is not None:
            self.writer.add_scalar("step/loss", progress.loss, global_step)
            self.writer.add_scalar("step/samples_per_s", progress.samples_per_s, global_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_run_dir(run_dir: str, resuming: bool) -> None:
    """Never write into an earlier run's folder unless resuming it."""
    if resuming or not os.path.isdir(run_dir):
        return
    checkpoints = os.path.join(run_dir, "checkpoints")
    if (os.path.exists(os.path.join(run_dir, "metrics.jsonl")) or os.path.exists(os.path.join(run_dir, "best.pt"))
            or (os.path.isdir(checkpoints) and os.listdir(checkpoints))):
        raise VirFaceError(f"run folder {run_dir} already holds a run; choose another "
                           f"--snapshot_prefix, delete it, or resume with --resume_file")


def _copy_atomic(src: str, dst: str) -> None:
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ---------------------------------------------------------------- the loop


def run_stage(config: TrainConfig, run_dir: str, data: StageData | None = None, *,
              ctx: DistributedContext | None = None, on_epoch_end: EpochCallback | None = None,
              on_progress: ProgressCallback | None = None, tb_dir: str | None = None,
              keep_epoch_checkpoints: bool = True) -> StageResult:
    """Train one stage for epochs (start..config.max_epoch] and return its history and checkpoints.

    ``run_dir`` gets checkpoints/epoch_NNN.pt, best.pt, metrics.jsonl and tb/ (rank 0 only).
    ``on_epoch_end(metrics, checkpoint_path)`` is called on every rank after each epoch; the path
    is None on ranks other than 0. ``on_progress(StepProgress)`` is called on rank 0 every
    ``config.log_every`` steps (default: a log line). ``data`` defaults to what ``config`` names.
    """
    ctx = ctx or DistributedContext.current(config.device)
    run_dir = os.path.abspath(run_dir)
    state, start_path = read_start_checkpoint(config)
    resuming = config.resume_file is not None
    if ctx.is_main:
        check_run_dir(run_dir, resuming)
    config = resolve_config(config, state, start_path)
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
    models = build_models(config)
    if ctx.is_main:
        log.info("%s: %d labeled images of %d identities%s; pair sets %s; %s (%.2fM parameters) "
                 "at %d px on %s x %d", config.method, len(data.labeled), data.labeled.num_classes,
                 f", {len(data.unlabeled)} unlabeled" if data.unlabeled is not None else "",
                 list(data.pair_sets) or "none", config.arch,
                 sum(p.numel() for p in models.backbone.parameters()) / 1e6, config.input_size,
                 ctx.device, ctx.world_size)
    if state is not None:
        load_models(models, state, start_path, with_generator=True)
    for module in (models.backbone, models.head, models.generator):
        if module is not None:
            module.to(ctx.device)
    optimizers = build_optimizers(config, models)
    schedulers = {name: torch.optim.lr_scheduler.MultiStepLR(opt, list(config.decay_steps), config.gamma)
                  for name, opt in optimizers.items()}
    start_epoch, best = 1, {}
    if resuming:
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            schedulers[name].load_state_dict(state["schedulers"][name])
        start_epoch = int(state["epoch"]) + 1
        best = dict(state.get("best") or {})
    del state

    # The generator stage freezes the backbone: its verification scores are the upstream's.
    pair_set_names = list(data.pair_sets) if config.eval and config.method != "generator" else []
    metric_name, metric_mode = selection_metric(config.method, pair_set_names, config.eval,
                                                config.best_metric)
    if best.get("metric") not in (None, metric_name):
        raise ConfigError(f"best_metric: the resumed run tracked {best['metric']!r}, not {metric_name!r}")
    torch.manual_seed(config.seed * 1000 + ctx.rank + start_epoch)

    backbone = models.backbone
    if ctx.is_distributed and config.method != "generator":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        backbone = nn.parallel.DistributedDataParallel(backbone, device_ids=device_ids)
    scaler = (torch.amp.GradScaler("cuda") if config.amp == "fp16" and ctx.device.type == "cuda" else None)
    step_fn = StageStep(config, models, backbone, optimizers, ctx, scaler)
    loader, sampler = make_train_loader(data, config, ctx.rank, ctx.world_size)

    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    if ctx.is_main and not resuming:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
    run_log = RunLog(run_dir, tb_dir, ctx.is_main, config.tensorboard,
                     start_epoch - 1 if resuming else None)
    history: list[dict[str, Any]] = []
    last_ckpt = None
    best_ckpt = os.path.join(run_dir, "best.pt") if best else None
    clock = RunClock(config.method, config.max_epoch)
    if on_progress is None:
        def on_progress(progress: StepProgress) -> None:
            log.info("%s", progress.line())
    try:
        for epoch in range(start_epoch, config.max_epoch + 1):
            report = ProgressReport(config, clock, epoch, run_log,
                                    on_progress if ctx.is_main else None)
            metrics = train_one_epoch(config, models, step_fn, loader, sampler, epoch, ctx,
                                      optimizers, report)
            for sched in schedulers.values():
                sched.step()
            if pair_set_names and ctx.is_main:
                eval_start = time.perf_counter()
                metrics.update(evaluate(models.backbone, data, ctx))
                clock.eval_s = time.perf_counter() - eval_start
            metrics = ctx.broadcast_object(metrics)
            if metric_name not in metrics:
                raise ConfigError(f"best_metric: {metric_name!r} is not among this stage's metrics "
                                  f"{sorted(metrics)}")
            value = float(metrics[metric_name])
            is_best = (not best or (value > best["value"] if metric_mode == "max" else value < best["value"]))
            if is_best:
                best = {"metric": metric_name, "mode": metric_mode, "value": value, "epoch": epoch}
            metrics["best_" + metric_name] = best["value"]
            ckpt_path = None
            if ctx.is_main:
                ckpt_path = os.path.join(run_dir, "checkpoints", f"epoch_{epoch:03d}.pt")
                save_checkpoint(checkpoint_state(config, models, optimizers, schedulers, epoch,
                                                 metrics, best), ckpt_path)
                if is_best:
                    best_ckpt = os.path.join(run_dir, "best.pt")
                    _copy_atomic(ckpt_path, best_ckpt)
                if last_ckpt and not keep_epoch_checkpoints:
                    os.unlink(last_ckpt)
                run_log.epoch(metrics, pair_set_names)
                log.info("%s epoch %d/%d %s", config.method, epoch, config.max_epoch, format_metrics(metrics))
            last_ckpt = ckpt_path
            history.append(metrics)
            if on_epoch_end is not None:
                on_epoch_end(metrics, ckpt_path)
    finally:
        run_log.close()
    return StageResult(history, run_dir, last_ckpt, best_ckpt, best)


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
    if config.method == "generator":
        models.backbone.eval()
        models.head.eval()
        models.generator.train()
    else:
        for module in (models.backbone, models.head, models.generator):
            if module is not None:
                module.train()
    sampler.set_epoch(epoch)
    lr = optimizers["main" if "main" in optimizers else "generator"].param_groups[0]["lr"]
    sums: dict[str, torch.Tensor] = {}
    pending: list[torch.Tensor] = []
    n_images, skipped, steps = 0, 0, 0
    n_steps = len(loader)
    start = time.perf_counter()
    for step, (images, labels, n_skipped) in enumerate(loader, start=1):
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


def checkpoint_state(config: TrainConfig, models: StageModels, optimizers, schedulers, epoch: int,
                     metrics: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    return {
        "stage": config.method,
        "epoch": epoch,
        "config": config.to_dict(),
        "metrics": metrics,
        "model": {k: getattr(config, k) for k in MODEL_KEYS},
        "backbone": models.backbone.state_dict(),
        "head": models.head.state_dict(),
        "generator": models.generator.state_dict() if models.generator is not None else None,
        "optimizers": {k: v.state_dict() for k, v in optimizers.items()},
        "schedulers": {k: v.state_dict() for k, v in schedulers.items()},
        "best": best,
    }


def format_metrics(metrics: dict[str, Any]) -> str:
    keys = [k for k in metrics if k.endswith("_acc") or k in ("loss", "samples_per_s", "lr")]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys)
