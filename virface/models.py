"""The modules a stage trains (backbone, ArcFace head, generator) and their optimisers, built from
a TrainConfig and the stage table."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from virface.backbones import build_backbone
from virface.config import TrainConfig
from virface.distributed import DistributedContext
from virface.generator import FeatureVAE
from virface.heads import ArcFaceHead
from virface.stage_table import stage_spec


@dataclass
class StageModels:
    backbone: nn.Module
    head: nn.Module                    # ArcFaceHead, or PartialFCHead with sample_rate
    generator: FeatureVAE | None = None

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.backbone, self.head, self.generator) if m is not None]


def build_models(config: TrainConfig, ctx: DistributedContext | None = None) -> StageModels:
    """Fresh modules for ``config`` (arch, feat_len, input_size and num_ids resolved); the
    generator only for the stages that need or train one. With ``sample_rate`` the head is
    Partial FC, its W sharded over ``ctx``'s ranks."""
    backbone = build_backbone(config.arch, feat_len=config.feat_len, input_size=config.input_size)
    if config.sample_rate is not None:
        from virface.partial_fc import PartialFCHead

        head = PartialFCHead(config.num_ids, config.feat_len, s=config.s, m=config.m,
                             dropout=config.resolved_dropout, sample_rate=config.sample_rate, ctx=ctx)
    else:
        head = ArcFaceHead(config.num_ids, config.feat_len, s=config.s, m=config.m,
                           dropout=config.resolved_dropout)
    generator = (FeatureVAE(config.feat_len, residual=bool(config.gen_residual))
                 if stage_spec(config.method).builds_generator else None)
    if generator is not None and config.generator_fixed:
        generator.requires_grad_(False)
    return StageModels(backbone, head, generator)


def split_decay(*modules: nn.Module) -> tuple[list, list]:
    """Weight decay on conv/linear weights and W; none on BatchNorm, PReLU and biases (1-d params)."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
    return decay, no_decay


def _param_groups(modules: list[nn.Module], weight_decay: float, lr: float | None = None) -> list[dict]:
    decay, no_decay = split_decay(*modules)
    extra = {} if lr is None else {"lr": lr}
    return [g for g in ({"params": decay, "weight_decay": weight_decay, **extra},
                        {"params": no_decay, "weight_decay": 0.0, **extra}) if g["params"]]


def build_optimizers(config: TrainConfig, models: StageModels) -> dict[str, torch.optim.Optimizer]:
    """SGD optimisers by name: ``main`` for backbone + head, ``generator`` for the generator, as
    far as the stage trains them. With ``optim_mode: joint`` one ``main`` optimiser holds both,
    the generator's parameter groups at ``g_lr`` (the reference code's single optimiser)."""
    spec = stage_spec(config.method)
    g_lr = config.g_lr or config.lr
    optimizers = {}
    main = [m for part, m in (("backbone", models.backbone), ("head", models.head)) if part in spec.trains]
    if main:
        optimizers["main"] = torch.optim.SGD(_param_groups(main, config.weight_decay),
                                             lr=config.lr, momentum=config.momentum)
    if spec.trains_generator and not config.generator_fixed:
        groups = _param_groups([models.generator], config.weight_decay, g_lr)
        if main and config.optim_mode == "joint":
            for group in groups:
                optimizers["main"].add_param_group(group)
        else:
            optimizers["generator"] = torch.optim.SGD(groups, lr=g_lr, momentum=config.momentum)
    return optimizers
