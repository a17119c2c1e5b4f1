"""One training step per stage, and the machinery they share.

:class:`StageStep` holds what every step needs (models, the DDP-wrapped backbone, optimisers,
the distributed context, mixed precision) and calls the stage's step function from the stage
table. A step function takes ``(step, images, labels)`` and returns the step's loss terms
(detached by the caller), ``loss`` first.

Per stage (x labeled features, u unlabeled features, W class weights, G the generator):
  pretrain   ArcFace CE on x                                   -> backbone + W
  generator  L2 * mse(G(x), W_y) + KL * kl, backbone frozen   -> G
             (gen_target same_identity: G(f_a) towards f_b, another image of a's identity,
             from a feature bank of the frozen backbone, + a diversity term)
  virclass   CE of x against [W; u] (u are negative classes)  -> backbone + W
  virface    virclass + CE of G's instances of u against [W; u.detach()]
             + the generator loss; ``alternate``: a G step then a backbone/W step with G frozen;
             ``joint``: one optimiser over everything (the reference code). The variants
             (config help, README "VirInstance variants") change where L_vi's gradient goes
             and what draws the instances (``StageStep.instance_sampler``).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from virface.config import TrainConfig
from virface.data.images import normalize_pixels
from virface.distributed import DistributedContext
from virface.generator import CovarianceTransfer, draw_agreement, generator_losses
from virface.models import StageModels
from virface.stage_table import stage_spec

Terms = dict[str, torch.Tensor]


def same_identity_partners(rows: torch.Tensor, start: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """For each of ``rows`` (n,) a uniformly random other row of its identity, whose rows are
    start[r] .. start[r] + size[r] - 1 (size >= 2): the row r + k (mod size) for k in 1..size-1."""
    s, k = start[rows], size[rows]
    shift = (torch.rand(rows.shape[0], device=rows.device) * (k - 1)).long().clamp_max(k - 2) + 1
    return s + (rows - s + shift) % k


class StageStep:
    """One training step of a stage; returns the loss terms of the step."""

    def __init__(self, config: TrainConfig, models: StageModels, backbone: nn.Module,
                 optimizers: dict[str, torch.optim.Optimizer], ctx: DistributedContext,
                 scaler: "torch.amp.GradScaler | None"):
        self.config, self.models, self.backbone = config, models, backbone
        self.optimizers, self.ctx, self.scaler = optimizers, ctx, scaler
        self.device = ctx.device
        amp = config.amp if self.device.type == "cuda" else "none"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.n_labeled = config.label_batch_size // ctx.world_size
        self.step_function = stage_spec(config.method).step_function()
        self.epochs_done = 0.0        # set by the loop before each step: (epoch - 1) + step fraction
        # What draws the virtual instances (.sample(sources, n)): the generator, unless the
        # stage sets another (covariance transfer, see build_instance_sampler).
        self.instance_sampler = models.generator
        # gen_target same_identity: (features (N, D), identity start (N,), identity size (N,)) of
        # labeled images grouped by identity, set by the stage (see set_variation_bank).
        self.variation_bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # The backbone's memory format on CUDA (see run_stage): its input must match, also for
        # torch.compile, which recompiles on an input of other strides.
        self.channels_last = config.channels_last and self.device.type == "cuda"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Terms:
        return self.step_function(self, images, labels.to(self.device, non_blocking=True))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) float32 features of uint8 (B, 3, S, S) images, randomly flipped."""
        x = normalize_pixels(images.to(self.device, non_blocking=True))
        # Random horizontal flip, the reference's only augmentation at 112 px.
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            feats = self.backbone(x)
        return feats.float()

    def backward_step(self, loss: torch.Tensor, optimizer: str,
                      manual_params: Iterable[nn.Parameter]) -> None:
        """Backward, average the gradients DDP does not own (``manual_params``), step."""
        opt = self.optimizers[optimizer]
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

    def generator_terms(self, x: torch.Tensor, labels: torch.Tensor) -> Terms:
        mse, kl = generator_losses(self.models.generator, x, self.models.head.class_centres(labels),
                                   target_grad=self.config.gen_target_grad)
        return {"gen_mse": mse, "gen_kl": kl, "gen_loss": self.config.L2 * mse + self.config.KL * kl}

    def set_variation_bank(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Features (N, D) and labels (N,) of labeled images, each identity's rows together and
        at least two of them (as instance_diagnostics.labeled_features returns them)."""
        change = torch.ones_like(labels, dtype=torch.bool)
        change[1:] = labels[1:] != labels[:-1]
        group = torch.cumsum(change.long(), 0) - 1
        starts = torch.nonzero(change).squeeze(1)
        sizes = torch.diff(torch.cat([starts, starts.new_tensor([labels.shape[0]])]))
        self.variation_bank = (feats, starts[group], sizes[group])

    def bank_pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (n, D) of n random bank images a and (n, D) of another image b of each a's
        identity."""
        feats, start, size = self.variation_bank
        a = torch.randint(0, feats.shape[0], (n,), device=feats.device)
        return feats[a], feats[same_identity_partners(a, start, size)]

    def same_identity_terms(self, f_a: torch.Tensor, f_b: torch.Tensor) -> Terms:
        """The within-identity generator's terms: L2 * mse(G(f_a), f_b) + KL * kl."""
        mse, kl = generator_losses(self.models.generator, f_a, f_b)
        return {"gen_mse": mse, "gen_kl": kl, "gen_loss": self.config.L2 * mse + self.config.KL * kl}

    def with_diversity(self, terms: Terms, x: torch.Tensor) -> Terms:
        """``terms`` plus gen_diversity * (agreement of two draws from x - the real same-identity
        cosine of as many bank pairs)^2, added to gen_loss."""
        f_a, f_b = self.bank_pairs(x.shape[0])
        gap = (draw_agreement(self.models.generator, x) - (f_a * f_b).sum(1).mean()).pow(2)
        return {**terms, "gen_diversity": gap, "gen_loss": terms["gen_loss"] + self.config.gen_diversity * gap}

    def vi_weight(self) -> float:
        """L_vi's weight now: ``vi_weight``, ramped linearly over ``vi_warmup_epochs``."""
        cfg = self.config
        if cfg.vi_warmup_epochs <= 0:
            return cfg.vi_weight
        return cfg.vi_weight * min(1.0, self.epochs_done / cfg.vi_warmup_epochs)

    def virtual_classes(self, feats: torch.Tensor, labels: torch.Tensor):
        """VirClass on this batch: the labeled rows against [W; every rank's kept unlabeled
        features]. Returns (loss_vc, terms, labeled x, labels y, local u, keep mask, centres)."""
        cfg, head = self.config, self.models.head
        x, y = feats[:self.n_labeled], labels[:self.n_labeled]
        u_local = feats[self.n_labeled:]
        u_all = self.ctx.all_gather_with_grad(u_local)     # every rank's virtual classes
        if cfg.overlap_threshold is not None:
            keep = head.overlap_keep_mask(u_all, cfg.overlap_threshold)
            centres = u_all[keep]          # boolean indexing waits for the GPU: only when filtering
            kept, dropped = keep.sum().float(), (~keep).sum().float()
        else:
            keep, centres = None, u_all
            kept, dropped = feats.new_tensor(float(u_all.shape[0])), feats.new_zeros(())
        loss_vc = head.virclass_loss(x, y, centres)
        terms = {"loss_vc": loss_vc, "virtual_classes": kept, "overlap_dropped": dropped}
        return loss_vc, terms, x, y, u_local, keep, centres


def pretrain_step(s: StageStep, images: torch.Tensor, labels: torch.Tensor) -> Terms:
    feats = s.features(images)
    loss = s.models.head.arcface_loss(feats, labels)
    s.backward_step(loss, "main", s.models.head.averaged_parameters())
    return {"loss": loss, "loss_arcface": loss}


def generator_step(s: StageStep, images: torch.Tensor, labels: torch.Tensor) -> Terms:
    if s.config.gen_target == "same_identity":
        # Pairs of the frozen backbone's bank: the batch gives only how many.
        x, f_b = s.bank_pairs(labels.shape[0])
        terms = s.same_identity_terms(x, f_b)
    else:
        with torch.no_grad():             # the backbone is frozen: no graph through it
            x = s.features(images)
        terms = s.generator_terms(x, labels)
    if s.config.gen_diversity > 0:
        terms = s.with_diversity(terms, x)
    s.backward_step(terms["gen_loss"], "generator", s.models.generator.parameters())
    return {"loss": terms["gen_loss"], **terms}


def virclass_step(s: StageStep, images: torch.Tensor, labels: torch.Tensor) -> Terms:
    loss_vc, terms, *_ = s.virtual_classes(s.features(images), labels)
    s.backward_step(loss_vc, "main", s.models.head.averaged_parameters())
    return {"loss": loss_vc, **terms}


def virface_step(s: StageStep, images: torch.Tensor, labels: torch.Tensor) -> Terms:
    cfg, head, gen, ctx = s.config, s.models.head, s.models.generator, s.ctx
    feats = s.features(images)
    loss_vc, out, x, y, u_local, keep, centres = s.virtual_classes(feats, labels)
    # VirInstance from this rank's kept unlabeled features (all of them without the overlap
    # filter: then no count has to come back from the GPU).
    n_local = u_local.shape[0]
    if keep is None:
        kept, offset = u_local, ctx.rank * n_local
    else:
        kept = u_local[keep[ctx.rank * n_local:(ctx.rank + 1) * n_local]]
        offset = int(keep[:ctx.rank * n_local].sum())
    # The reference detaches the sources: L_vi reaches W (and G) only. vi_to_backbone lets it
    # reach the backbone too, through the generator's input; vi_centre_grad through the centres.
    sources = F.normalize(kept if cfg.vi_to_backbone else kept.detach(), dim=1)
    joint = cfg.optim_mode == "joint"
    trains_g = not cfg.generator_fixed      # else no generator terms at all: G stays as loaded
    terms: Terms = {}
    sample = s.instance_sampler.sample
    if trains_g and not joint:
        # Alternate: first a generator step on detached features (backbone frozen) ...
        terms = s.generator_terms(x, y)
        g_loss = terms["gen_loss"]
        if cfg.vi_gen_grad:
            # ... taking L_vi's gradient too: instances of the detached sources, drawn before the
            # step; W's gradient from it is cleared before the backbone/W step.
            drawn = sample(sources.detach(), cfg.gen_num) if cfg.gen_num else None
            if drawn is not None:
                g_loss = g_loss + s.vi_weight() * head.virinstance_loss(drawn, centres, cfg.gen_num, offset)
        s.backward_step(g_loss, "generator", gen.parameters())
    with torch.set_grad_enabled(joint or cfg.vi_to_backbone):
        # Drawn also for no sources: a sharded head's loss is a collective every rank joins.
        instances = sample(sources, cfg.gen_num) if cfg.gen_num else None
    loss_vi = (head.virinstance_loss(instances, centres, cfg.gen_num, offset, centre_grad=cfg.vi_centre_grad)
               if instances is not None else feats.new_zeros(()))
    weighted_vi = s.vi_weight() * loss_vi
    if joint:
        loss = loss_vc + weighted_vi
        if trains_g:
            terms = s.generator_terms(x, y)
            loss = loss + terms["gen_loss"]
        s.backward_step(loss, "main", [*head.averaged_parameters(), *(gen.parameters() if trains_g else [])])
    else:
        # ... then a backbone/W step with the generator frozen (its optimiser does not step
        # here; gradients L_vi leaves on it are cleared before its next step).
        s.backward_step(loss_vc + weighted_vi, "main", head.averaged_parameters())
        loss = loss_vc + weighted_vi + (terms["gen_loss"].detach() if terms else 0.0)
    return {"loss": loss, "loss_vi": loss_vi, **out, **terms}


def build_instance_sampler(config: TrainConfig, models: StageModels, data, device: torch.device):
    """What draws a virface stage's instances (``.sample(sources, n)``): the generator, or with
    ``vi_generator: covariance`` a CovarianceTransfer estimated from the backbone's features of
    ``variation_images`` labeled images of ``data`` (a StageData)."""
    if config.vi_generator != "covariance":
        return models.generator
    from virface.instance_diagnostics import labeled_features

    feats, labels = labeled_features(models.backbone, data, config.variation_images, device)
    return CovarianceTransfer.from_features(feats, labels, config.cov_rank, config.cov_scale)
