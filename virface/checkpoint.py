"""Checkpoints, in one place: their format, atomic save, strict load, and what a stage may start
or resume from.

A checkpoint is a dict of plain types and tensors (loadable with ``weights_only=True``):
  format, version, stage, epoch, config, metrics, model {arch, feat_len, input_size, num_ids},
  backbone, head, generator (when the stage has one), optimizers {name: state},
  schedulers {name: state}, best {metric, mode, value, epoch}.
The model description makes a checkpoint loadable without its config: :func:`load_backbone`.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Mapping

import torch
import torch.nn as nn

from virface.fileio import atomic_open
from virface.config import GENERATOR_FIELDS, TrainConfig, inherited_fields
from virface.errors import CheckpointError, ConfigError, StagePreconditionError
from virface.stage_table import producer_of, stage_spec

FORMAT = "virface-checkpoint"
VERSION = 1
log = logging.getLogger("virface")
MODEL_KEYS = ("arch", "feat_len", "input_size", "num_ids")   # required in every checkpoint


# ---------------------------------------------------------------- format and file I/O


def checkpoint_state(config: TrainConfig, models, optimizers: Mapping, schedulers: Mapping, epoch: int,
                     metrics: dict[str, Any], best: dict[str, Any], run_dir: str,
                     head_state: Mapping | None = None,
                     optimizer_states: Mapping | None = None) -> dict[str, Any]:
    """The checkpoint of ``models`` (a StageModels) after ``epoch`` of the run in ``run_dir``.
    ``head_state`` / ``optimizer_states``: the full ones a sharded head's ranks gathered (see
    virface.partial_fc); by default the modules' own."""
    return {
        "stage": config.method,
        "epoch": epoch,
        "run_dir": os.path.abspath(run_dir),
        "config": config.to_dict(),
        "metrics": metrics,
        # The generator's fields only where there is a generator to describe.
        "model": {k: getattr(config, k) for k in MODEL_KEYS
                  + (GENERATOR_FIELDS if models.generator is not None else ())},
        "backbone": models.backbone.state_dict(),
        "head": dict(head_state) if head_state is not None else models.head.state_dict(),
        "generator": models.generator.state_dict() if models.generator is not None else None,
        "optimizers": (dict(optimizer_states) if optimizer_states is not None
                       else {k: v.state_dict() for k, v in optimizers.items()}),
        "schedulers": {k: v.state_dict() for k, v in schedulers.items()},
        "best": best,
    }


def save_checkpoint(state: Mapping[str, Any], path: str) -> str:
    """Write ``state`` to ``path`` via a temporary file in the same folder and a rename, so a
    crash never leaves a half-written checkpoint under the final name."""
    with atomic_open(path) as f:
        torch.save(dict(state, format=FORMAT, version=VERSION), f)
    return path


def copy_checkpoint(source: str, target: str) -> str:
    """Copy a checkpoint file atomically (best.pt from an epoch's checkpoint)."""
    with open(source, "rb") as src, atomic_open(target) as dst:
        shutil.copyfileobj(src, dst)
    return target


def load_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint file's state; ``path`` may be a storage URI (``s3://...``, see
    virface.storage), read through a downloaded copy."""
    from virface import storage

    try:
        local = storage.local_file(path)
    except FileNotFoundError:
        local = None
    if local is None or not os.path.isfile(local):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a virface checkpoint (no format={FORMAT!r} key)")
    return state


def model_meta(state: Mapping[str, Any], path: str) -> dict[str, Any]:
    meta = state.get("model")
    if not isinstance(meta, dict) or any(k not in meta for k in MODEL_KEYS):
        raise CheckpointError(f"{path}: missing model description keys {list(MODEL_KEYS)}")
    return dict(meta)


# ---------------------------------------------------------------- loading into modules


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


def load_models(models, state: Mapping[str, Any], path: str) -> None:
    """Load backbone, head and (when both have one) generator of ``state`` into ``models``."""
    load_module_state(models.backbone, state["backbone"], "backbone", path)
    head_loader = getattr(models.head, "load_full_state_dict", None)    # a sharded head
    if head_loader is not None:
        head_loader(state["head"], path)
    else:
        load_module_state(models.head, state["head"], "head", path)
    if models.generator is not None and state.get("generator") is not None:
        load_module_state(models.generator, state["generator"], "generator", path)


def load_backbone(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The backbone of any stage's checkpoint, built from its model description, in eval mode on
    ``device``; and the checkpoint. For evaluation and benchmarks."""
    from virface.backbones import build_backbone

    state = load_checkpoint(path)
    meta = model_meta(state, path)
    backbone = build_backbone(meta["arch"], feat_len=meta["feat_len"], input_size=meta["input_size"])
    load_module_state(backbone, state["backbone"], "backbone", path)
    return backbone.to(device).eval(), state


# ---------------------------------------------------------------- what a stage starts from


def check_stage_preconditions(stage: str, state: Mapping[str, Any] | None, path: str | None) -> None:
    """Fail before any data is read when ``stage`` cannot start from ``state``."""
    needs = stage_spec(stage).needs
    if not needs:
        return
    if state is None:
        raise StagePreconditionError(
            f"stage {stage} needs a checkpoint with {' + '.join(needs)}; give --pretrained_file "
            f"(the best.pt of a {producer_of(needs[-1])} run)")
    absent = [k for k in needs if state.get(k) is None]
    if absent:
        raise StagePreconditionError(
            f"{path}: stage {stage} needs {' + '.join(needs)}, but this {state.get('stage')} "
            f"checkpoint has no {' or '.join(absent)}; train the {producer_of(absent[-1])} stage first")


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


def inherit_model_fields(config: TrainConfig, state: dict | None, path: str | None) -> TrainConfig:
    """Fill the model-shaping fields from the start checkpoint; an explicit disagreement is an error."""
    if state is None:
        return config
    meta = model_meta(state, path)
    changes: dict[str, Any] = {}
    for key in inherited_fields(config.method):
        if meta.get(key) is None:       # an older checkpoint, or one without a generator
            continue
        given = getattr(config, key)
        if given is not None and given != meta[key]:
            raise ConfigError(f"{key}: {given!r} was given, but {path} was trained with "
                              f"{key}={meta[key]!r}; it is inherited from the checkpoint")
        changes[key] = meta[key]
    upstream_cfg = state.get("config") or {}
    # The head's classes are the upstream's labeled identities: the same data must come back.
    if config.uses_synthetic and not config.synthetic and upstream_cfg.get("synthetic"):
        changes["synthetic"] = upstream_cfg["synthetic"]
    adopted = checkpoint_data(config.to_dict(), state, path)
    if adopted:
        log.info("%s: no data options were given; %s was trained on other data than the built-in "
                 "synthetic faces, so this run uses the data it records: %s", config.method, path,
                 format_data_options(adopted))
        changes.update(adopted)
    return config.replace(**changes)


# The options naming a run's data, as the checkpoint's config records them.
DATA_FIELDS = ("labeled", "labeled_root", "unlabeled", "unlabeled_root", "val", "test")


def format_data_options(values: Mapping[str, Any]) -> str:
    """``--labeled /d/train.rec --val lfw=/d/lfw.bin ...``: data fields as the options that give them."""
    words = []
    for key in DATA_FIELDS:
        value = values.get(key)
        if isinstance(value, Mapping):
            words += [f"--{key} {name}={where}" for name, where in value.items()]
        elif value:
            words.append(f"--{key} {value}")
    return " ".join(words)


def checkpoint_data(given: Mapping[str, Any], state: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The data fields a run must take from its start checkpoint: those the checkpoint records
    when the run was given no labeled data (which would mean the built-in synthetic faces) but the
    checkpoint was trained on other data; empty otherwise. Pair sets given are kept. A recorded
    path that is not here, or a stage needing unlabeled data the checkpoint does not record, is a
    ConfigError naming the options to give, never a silent switch to the synthetic faces."""
    recorded = state.get("config") or {}
    if given.get("labeled") or not recorded.get("labeled"):
        return {}
    method = given.get("method") or state.get("stage")
    # The unlabeled faces too, also through a stage that does not read them (generator), so a
    # chain continued from that stage still has them.
    adopted = {k: recorded.get(k) for k in ("labeled", "labeled_root", "unlabeled", "unlabeled_root")}
    for key in ("val", "test"):
        adopted[key] = dict(given.get(key) or {}) or dict(recorded.get(key) or {})
    missing = [f"{k} {v}" for k, v in adopted.items() if isinstance(v, str) and not os.path.exists(v)]
    missing += [f"{k} {name}={where}" for k in ("val", "test") for name, where in adopted[k].items()
                if not os.path.exists(where)]
    needs_unlabeled = stage_spec(method).uses_unlabeled and not adopted.get("unlabeled")
    if missing or needs_unlabeled:
        problem = (f"not found here: {', '.join(missing)}" if missing
                   else f"stage {method} needs unlabeled data, and the checkpoint records none")
        raise ConfigError(
            f"{path} was trained on other data than the built-in synthetic faces "
            f"({format_data_options(recorded)}) and no data options were given, so the run would "
            f"take that data, but {problem}. Give the data explicitly: --labeled PATH (the "
            f"identities it was trained on)"
            + (" --unlabeled PATH" if stage_spec(method).uses_unlabeled else "")
            + " --val NAME=PATH")
    return adopted


def check_start_checkpoint(config: TrainConfig) -> None:
    """Everything about ``config``'s start checkpoint that can fail, without reading data: the
    stage may start from it, and its weights fit the model the stage builds."""
    from virface.models import build_models

    state, path = read_start_checkpoint(config)
    if state is not None:
        load_models(build_models(inherit_model_fields(config, state, path)), state, path)


# ---------------------------------------------------------------- resuming a run

# What a resumed run may set anew; everything else is the checkpoint's (a resumed run that
# silently trained with other settings would be another run under the old one's name).
RESUME_MAY_CHANGE = ("max_epoch", "log_every", "device", "loader_workers", "tensorboard",
                     "strict_data", "amp", "sample_rate", "channels_last", "compile",
                     "resume_file", "snapshot_prefix")
# Set per invocation, not part of what was trained.
_NOT_COMPARED = ("resume_file", "pretrained_file", "snapshot_prefix")


def checkpoint_run_dir(path: str) -> str | None:
    """The run folder a checkpoint file is in *now*: ``<run>`` for ``<run>/checkpoints/epoch_NNN.pt``
    and for ``<run>/best.pt`` (a folder holding the run's config.json); None for a file outside a
    run folder. The folder the checkpoint was written in (its ``run_dir``) is not asked: a copied
    or moved run folder resumes where it is now, and the original is never written to."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == "checkpoints":
        return os.path.dirname(folder)
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def resume_config(state: Mapping[str, Any], path: str, given: Mapping[str, Any]) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with the options ``given`` that may change
    (RESUME_MAY_CHANGE); another value for any other setting is a ConfigError naming it."""
    saved = dict(state.get("config") or {})
    for key, value in given.items():
        if key in RESUME_MAY_CHANGE or key == "method":
            continue
        if value != saved.get(key):
            raise ConfigError(f"{key}: {value!r} was given, but the run in {path} was trained with "
                              f"{key}={saved.get(key)!r}; a resumed run keeps its settings (it may "
                              f"change only {list(RESUME_MAY_CHANGE[:-2])})")
    values = {**saved, **{k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}}
    values["resume_file"] = path
    values["pretrained_file"] = None
    if "snapshot_prefix" not in given:
        values["snapshot_prefix"] = checkpoint_run_dir(path)
    return TrainConfig.from_dict(values)


def check_resume(config: TrainConfig, state: Mapping[str, Any], path: str, run_dir: str) -> None:
    """Before a resumed run writes anything: its settings are the checkpoint's (but for those
    that may change; a None means "derive" and fits any value), and ``run_dir`` is its own run
    folder or a new one, never another run's."""
    saved = state.get("config") or {}
    for key, value in config.to_dict().items():
        if key in RESUME_MAY_CHANGE or key in _NOT_COMPARED or value is None or key not in saved:
            continue
        if value != saved[key] and not (isinstance(value, list) and list(saved[key] or []) == value):
            raise ConfigError(f"{key}: {value!r}, but the run in {path} was trained with "
                              f"{key}={saved[key]!r}; a resumed run keeps its settings")
    own = checkpoint_run_dir(path)
    holds_a_run = os.path.exists(os.path.join(run_dir, "config.json"))
    if holds_a_run and (own is None or os.path.abspath(run_dir) != os.path.abspath(own)):
        whose = f"the one {path} belongs to ({own})" if own else f"{path} (a file outside any run folder)"
        raise ConfigError(f"run folder {run_dir} holds another run than {whose}; a resumed run "
                          f"writes only into its own run folder or a new one")
