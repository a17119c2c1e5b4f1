"""Checkpoints: one file per stage epoch, written atomically, loaded strictly.

A checkpoint is a dict of plain types and tensors (loadable with ``weights_only=True``):
  format, version, stage, epoch, config, metrics, model {arch, feat_len, input_size, num_ids},
  backbone, head, generator (when the stage has one), optimizers {name: state},
  schedulers {name: state}, best {metric, mode, value, epoch}.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from virface.atomic import atomic_open
from virface.errors import CheckpointError, StagePreconditionError

FORMAT = "virface-checkpoint"
VERSION = 1
MODEL_KEYS = ("arch", "feat_len", "input_size", "num_ids")

# What each stage needs from the checkpoint it starts from.
STAGE_NEEDS = {
    "pretrain": (),
    "generator": ("backbone", "head"),
    "virclass": ("backbone", "head"),
    "virface": ("backbone", "head", "generator"),
}
STAGE_PRODUCER = {"backbone": "pretrain", "head": "pretrain", "generator": "generator"}


def save_checkpoint(state: Mapping[str, Any], path: str) -> str:
    """Write ``state`` to ``path`` via a temporary file in the same folder and a rename, so a
    crash never leaves a half-written checkpoint under the final name."""
    with atomic_open(path) as f:
        torch.save(dict(state, format=FORMAT, version=VERSION), f)
    return path


def load_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a virface checkpoint (no format={FORMAT!r} key)")
    return state


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix DataParallel/DDP add, wherever the checkpoint came from."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def load_module_state(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, path: str) -> None:
    """Load strictly: any missing, unexpected or mis-shaped parameter is an error naming them.

    The reference kept only keys already present and printed the rest, so a checkpoint saved with
    another GPU count loaded nothing and training went on from random weights.
    """
    state_dict = strip_module_prefix(state_dict)
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state_dict)) if own[k].shape != state_dict[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label} {len(items)}: {items[:8]}{more}")
        raise CheckpointError(f"{path}: the {what} does not fit the model: " + "; ".join(parts))
    module.load_state_dict(state_dict)


def check_stage_preconditions(stage: str, state: Mapping[str, Any] | None, path: str | None) -> None:
    """Fail before any data is read when ``stage`` cannot start from ``state``."""
    needs = STAGE_NEEDS[stage]
    if not needs:
        return
    if state is None:
        raise StagePreconditionError(
            f"stage {stage} needs a checkpoint with {' + '.join(needs)}; give --pretrained_file "
            f"(the best.pt of a {STAGE_PRODUCER[needs[-1]]} run)")
    absent = [k for k in needs if state.get(k) is None]
    if absent:
        producer = STAGE_PRODUCER[absent[-1]]
        raise StagePreconditionError(
            f"{path}: stage {stage} needs {' + '.join(needs)}, but this {state.get('stage')} "
            f"checkpoint has no {' or '.join(absent)}; train the {producer} stage first")


def model_meta(state: Mapping[str, Any], path: str) -> dict[str, Any]:
    meta = state.get("model")
    if not isinstance(meta, dict) or any(k not in meta for k in MODEL_KEYS):
        raise CheckpointError(f"{path}: missing model description keys {list(MODEL_KEYS)}")
    return dict(meta)
