"""Stage chaining: which stages a search must run, and the checkpoint each one starts from.

The stages form a tree, pretrain -> generator -> virface and pretrain -> virclass. When a stage's
search finishes, the runner writes ``<storage>/<experiment>/<stage>/best.json``: a
:class:`StageManifest` naming the best trial, its config, its metric and the checkpoint of its
best epoch. A later search of a downstream stage reuses that manifest instead of searching the
upstream stage again; a user checkpoint (``from_checkpoint``) replaces the upstream stages
entirely.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from virface import storage
from virface.fileio import read_text, write_text_atomic
from virface.errors import CheckpointError, ConfigError, StagePreconditionError, VirFaceError
from virface.metrics import METRIC_MODES
from virface.stage_table import STAGES, stage_spec


MANIFEST_NAME = "best.json"


class ManifestError(VirFaceError):
    """A stage manifest is missing, unreadable or malformed; the message names file and key."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class StageManifest:
    """The outcome of one stage's search: its best trial and where that trial's best epoch is."""

    stage: str
    experiment: str
    trial_id: str
    config: dict[str, Any]             # the trial's TrainConfig fields
    metric_name: str
    metric_value: float
    metric_mode: str                   # "max" | "min"
    checkpoint: str                    # absolute path (or storage URI) of the best epoch's checkpoint
    upstream: str | None = None        # upstream manifest or user checkpoint; None for pretrain
    created: str = field(default_factory=_now)   # ISO 8601, UTC
    # The chosen checkpoint's --test pair-set figures (each accuracy with its ``_acc_se`` over
    # pairs and ``_acc_std`` over folds): reported, never selected on.
    test_metrics: dict[str, float] = field(default_factory=dict)
    # The standard error over pairs of metric_value, when it is a pair set's accuracy.
    metric_se: float | None = None
    # "stage:trial_id" from pretrain down to this trial: which upstream trial each stage started from.
    lineage: list[str] = field(default_factory=list)
    # --carry_top K > 1: the K best trials, best first, each passed on to the next stage as a
    # choice of its ``upstream`` parameter: {trial_id, checkpoint, metric_value, params,
    # upstream (the upstream trial it started from), lineage}.
    carried: list[dict[str, Any]] = field(default_factory=list)
    # Trial id -> the upstream trial it started from, when this stage chose among several.
    trial_upstreams: dict[str, str] = field(default_factory=dict)
    # Several objectives: {objectives, select, front: [{trial_id, values, checkpoint, params}],
    # plot}; the trial above is the one the select rule picked from the front.
    pareto: dict[str, Any] | None = None
    # The generator and virface stages: the chosen epoch's instance diagnostics (vi_* metrics).
    instance_metrics: dict[str, float] = field(default_factory=dict)
    # virface-search's options that overrode every stage's space (num_samples, max_epoch,
    # steps_per_epoch, seed), as given.
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # Written only when used, so a plain search's manifest reads as it always did.
        for key in ("carried", "trial_upstreams", "pareto", "instance_metrics", "metric_se", "overrides"):
            if not data[key]:
                del data[key]
        return data


_FIELDS = {f.name: f for f in dataclasses.fields(StageManifest)}
_REQUIRED = [name for name, f in _FIELDS.items()
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def manifest_path(storage: str | os.PathLike, experiment: str, stage: str) -> Path:
    """``<storage>/<experiment>/<stage>/best.json``, absolute."""
    stage_spec(stage)
    return Path(os.path.abspath(storage)) / experiment / stage / MANIFEST_NAME


def write_manifest(manifest: StageManifest, path: str | os.PathLike) -> Path:
    """Write ``manifest`` as JSON, atomically: readers see the old file or the new one, never half.

    Creates the folders. The checkpoint path must be absolute, since trials run in another
    working directory than the one that reads the manifest, or a storage URI (``s3://...``).
    """
    if manifest.stage not in STAGES:
        raise ManifestError(f"{os.fspath(path)}: stage: {manifest.stage!r} is not one of "
                            f"{list(STAGES)}")
    if not (os.path.isabs(manifest.checkpoint) or storage.is_uri(manifest.checkpoint)):
        raise ManifestError(f"{os.fspath(path)}: checkpoint: {manifest.checkpoint!r} must be "
                            "an absolute path")
    path = Path(path)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    write_text_atomic(path, text)
    return path


def read_manifest(path: str | os.PathLike) -> StageManifest:
    """Read and check a manifest. A relative ``checkpoint`` (hand-written manifests) is taken
    relative to the manifest's folder; the checkpoint must exist."""
    where = os.fspath(path)
    text = read_text(path, "manifest", ManifestError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}:{e.lineno}: invalid JSON (column {e.colno}): {e.msg}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object with keys {list(_FIELDS)}, "
                            f"got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; allowed keys: {list(_FIELDS)}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ManifestError(f"{where}: missing key(s) {missing}")

    def bad(key: str, expected: str) -> ManifestError:
        return ManifestError(f"{where}: {key}: {data[key]!r} must be {expected}")

    for key in ("stage", "experiment", "trial_id", "metric_name", "checkpoint"):
        if not isinstance(data[key], str) or not data[key]:
            raise bad(key, "a non-empty string")
    if data["stage"] not in STAGES:
        raise bad("stage", f"one of {list(STAGES)}")
    if data["metric_mode"] not in METRIC_MODES:
        raise bad("metric_mode", f"one of {list(METRIC_MODES)}")
    value = data["metric_value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad("metric_value", "a finite number")
    if not isinstance(data["config"], dict):
        raise bad("config", "a JSON object of TrainConfig fields")
    se = data.get("metric_se")
    if se is not None and (isinstance(se, bool) or not isinstance(se, (int, float))
                           or not math.isfinite(se) or se < 0):
        raise bad("metric_se", "a finite number >= 0 or null")
    for key in ("upstream", "created"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise bad(key, "a string or null")
    for key, kind, expected in (("test_metrics", dict, "a JSON object of metric -> value"),
                                ("lineage", list, "a list of 'stage:trial_id'"),
                                ("carried", list, "a list of carried trials"),
                                ("trial_upstreams", dict, "a JSON object of trial id -> upstream trial id"),
                                ("pareto", (dict, type(None)), "a JSON object or null"),
                                ("instance_metrics", dict, "a JSON object of metric -> value"),
                                ("overrides", dict, "a JSON object of option -> value")):
        if key in data and not isinstance(data[key], kind):
            raise bad(key, expected)
    for i, entry in enumerate(data.get("carried") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("trial_id"), str) \
                or not isinstance(entry.get("checkpoint"), str):
            raise ManifestError(f"{where}: carried[{i}]: {entry!r} must be an object with a "
                                f"trial_id and a checkpoint")

    checkpoint = data["checkpoint"]
    if not storage.is_uri(checkpoint):
        checkpoint = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(where)), checkpoint))
    if not storage.exists(checkpoint):
        raise ManifestError(f"{where}: checkpoint: {checkpoint} does not exist (moved or "
                            f"deleted?); delete the manifest to search stage "
                            f"{data['stage']} again")
    return StageManifest(**{**data, "checkpoint": checkpoint, "metric_value": float(value)})


def plan_chain(stage: str, storage: str | os.PathLike, experiment: str,
               from_checkpoint: str | None) -> list[str]:
    """The stages to search, in order, to get ``stage``'s best checkpoint.

    Walks upstream from ``stage`` and stops at the first stage whose manifest exists (its best
    checkpoint is reused), or right away when ``from_checkpoint`` is given (the user's checkpoint
    replaces every upstream stage). ``stage`` itself always runs. An existing upstream manifest
    is read, so a broken one fails here, before anything runs.
    """
    stage_spec(stage)
    if from_checkpoint is not None:
        _check_user_checkpoint(stage, from_checkpoint)
        return [stage]
    chain = [stage]
    upstream = STAGES[stage].upstream
    while upstream is not None:
        path = manifest_path(storage, experiment, upstream)
        if path.exists():
            _read_stage_manifest(path, upstream)
            break
        chain.insert(0, upstream)
        upstream = STAGES[upstream].upstream
    return chain


def upstream_checkpoint(stage: str, storage: str | os.PathLike, experiment: str,
                        from_checkpoint: str | None) -> tuple[str | None, str]:
    """``(checkpoint path, where it came from)`` for the checkpoint ``stage`` starts from.

    ``(None, ...)`` for pretrain; the user's ``from_checkpoint`` when given; otherwise the best
    checkpoint in the upstream stage's manifest, which must exist by the time this is called
    (the upstream search ran, or ran in an earlier invocation).
    """
    stage_spec(stage)
    if from_checkpoint is not None:
        path = _check_user_checkpoint(stage, from_checkpoint)
        return path, f"user checkpoint {path}"
    upstream = STAGES[stage].upstream
    if upstream is None:
        return None, "none: pretrain starts from scratch"
    path = manifest_path(storage, experiment, upstream)
    if not path.exists():
        raise StagePreconditionError(
            f"stage {stage} starts from the best {upstream} checkpoint, but {path} does not "
            f"exist; search stage {upstream} first, or give a checkpoint to start from")
    m = _read_stage_manifest(path, upstream)
    return m.checkpoint, (f"best {upstream} trial {m.trial_id} "
                          f"({m.metric_name}={m.metric_value:.6g}) from {path}")


def upstream_manifest(stage: str, storage: str | os.PathLike, experiment: str,
                      from_checkpoint: str | None) -> StageManifest | None:
    """The upstream stage's manifest that ``stage`` starts from; None for pretrain or a user
    checkpoint."""
    upstream = STAGES[stage].upstream
    if from_checkpoint is not None or upstream is None:
        return None
    path = manifest_path(storage, experiment, upstream)
    return _read_stage_manifest(path, upstream) if path.exists() else None


def carried_choices(manifest: StageManifest | None) -> dict[str, dict[str, Any]]:
    """Upstream trial id -> its carried entry, when the upstream stage carried two or more
    trials on (--carry_top); empty otherwise (the stage starts from the one best checkpoint).
    A carried checkpoint that is gone is an error naming it."""
    if manifest is None or len(manifest.carried) < 2:
        return {}
    choices = {}
    for entry in manifest.carried:
        if not storage.exists(entry["checkpoint"]):
            raise ManifestError(f"stage {manifest.stage}: carried trial {entry['trial_id']}: "
                                f"checkpoint {entry['checkpoint']} does not exist (moved or deleted?)")
        choices[entry["trial_id"]] = entry
    return choices


def manifest_lineage(manifest: StageManifest | None) -> list[str]:
    """The lineage of a manifest's chosen trial (older manifests recorded none: just itself)."""
    if manifest is None:
        return []
    return list(manifest.lineage) or [f"{manifest.stage}:{manifest.trial_id}"]


def _read_stage_manifest(path: Path, stage: str) -> StageManifest:
    manifest = read_manifest(path)
    if manifest.stage != stage:
        raise ManifestError(f"{path}: stage: {manifest.stage!r} but the file is where stage "
                            f"{stage}'s manifest belongs")
    return manifest


def _check_user_checkpoint(stage: str, from_checkpoint: str | os.PathLike) -> str:
    if STAGES[stage].is_first:
        raise ConfigError(f"from_checkpoint: stage {stage} has no upstream stage to replace; "
                          f"it applies to {[name for name, spec in STAGES.items() if not spec.is_first]}")
    path = from_checkpoint if storage.is_uri(from_checkpoint) else os.path.abspath(from_checkpoint)
    if not storage.exists(path):
        raise CheckpointError(f"from_checkpoint: {path} does not exist")
    return path
