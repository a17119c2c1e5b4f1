"""The stages, as one table: what each starts from, needs, trains and reports.

Every stage-dependent decision in the library reads this table (the loop, checkpoints, chaining,
search spaces); nothing else compares stage names. Adding a stage is a row here plus its step
function. The table is plain data (no torch), so configuration and search code can read it
cheaply; ``step`` names the step function as ``module:function`` and is imported when a stage runs.

Checkpoint parts: ``backbone``, ``head`` (the ArcFace class weights W), ``generator`` (the VAE).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from virface.errors import ConfigError


@dataclass(frozen=True)
class StageSpec:
    name: str
    upstream: str | None            # the stage whose best checkpoint it starts from
    needs: tuple[str, ...]          # checkpoint parts it must find in that checkpoint
    trains: tuple[str, ...]         # parts it updates (and so writes anew)
    uses_unlabeled: bool            # reads the unlabeled shallow faces
    loss_terms: tuple[str, ...]     # per-epoch metrics its step reports besides ``loss``
    step: str                       # "module:function", the step function (see virface.steps)
    default_metric: str | None = None   # selects best.pt when no pair set applies; None: the
                                        # hardest pair set's accuracy

    @property
    def trains_backbone(self) -> bool:
        """A stage that leaves the backbone frozen has nothing new to verify."""
        return "backbone" in self.trains

    @property
    def trains_generator(self) -> bool:
        return "generator" in self.trains

    @property
    def needs_generator(self) -> bool:
        """It starts from a trained generator (and so takes over what its output means)."""
        return "generator" in self.needs

    @property
    def builds_generator(self) -> bool:
        return self.needs_generator or self.trains_generator

    @property
    def is_first(self) -> bool:
        """The first stage trains from scratch, so it alone chooses the model's shape."""
        return self.upstream is None

    def step_function(self) -> Callable:
        module, _, name = self.step.partition(":")
        return getattr(importlib.import_module(module), name)


_VC_TERMS = ("loss_vc", "virtual_classes", "overlap_dropped")
_GEN_TERMS = ("gen_mse", "gen_kl", "gen_loss")

STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("pretrain", upstream=None, needs=(), trains=("backbone", "head"), uses_unlabeled=False,
              loss_terms=("loss_arcface",), step="virface.steps:pretrain_step"),
    StageSpec("generator", upstream="pretrain", needs=("backbone", "head"), trains=("generator",),
              uses_unlabeled=False, loss_terms=_GEN_TERMS, step="virface.steps:generator_step",
              default_metric="gen_loss"),
    StageSpec("virclass", upstream="pretrain", needs=("backbone", "head"), trains=("backbone", "head"),
              uses_unlabeled=True, loss_terms=_VC_TERMS, step="virface.steps:virclass_step"),
    StageSpec("virface", upstream="generator", needs=("backbone", "head", "generator"),
              trains=("backbone", "head", "generator"), uses_unlabeled=True,
              loss_terms=_VC_TERMS + ("loss_vi",) + _GEN_TERMS, step="virface.steps:virface_step"),
    # What VirClass and VirFace must beat: the pretrained model trained on for as long, on the
    # labeled faces alone, with the same schedule and labeled-feature dropout to search.
    StageSpec("baseline", upstream="pretrain", needs=("backbone", "head"), trains=("backbone", "head"),
              uses_unlabeled=False, loss_terms=("loss_arcface",), step="virface.steps:pretrain_step"),
)}


def stage_spec(name: str) -> StageSpec:
    """The row of ``name``; an unknown name is a ConfigError listing the stages."""
    if name not in STAGES:
        raise ConfigError(f"stage: {name!r} is not one of {list(STAGES)}")
    return STAGES[name]


def stage_chain(name: str) -> list[str]:
    """The stages from the first down to ``name``, in run order: virface -> [pretrain, generator,
    virface]."""
    chain = [stage_spec(name).name]
    while STAGES[chain[0]].upstream is not None:
        chain.insert(0, STAGES[chain[0]].upstream)
    return chain


def producer_of(part: str) -> str:
    """The first stage (in chain order) that trains checkpoint ``part``."""
    return next(spec.name for spec in STAGES.values() if part in spec.trains)
