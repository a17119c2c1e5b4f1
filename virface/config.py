"""Run configuration: one typed dataclass, validated on construction.

The field names follow the reference's ``train.py`` arguments (``label_batch_size``, ``gen_num``,
``KL``, ``L2``, ...) so that its users recognise them; the CLI and the search spaces use the same
names. Configuration is data: nothing here is edited to configure a run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from virface.errors import ConfigError

METHODS = ("pretrain", "generator", "virclass", "virface")
OPTIM_MODES = ("alternate", "joint")
AMP_MODES = ("none", "bf16", "fp16")

# What a later stage must take over from the checkpoint it starts from (it shapes the weights).
INHERITED_FIELDS = ("arch", "feat_len", "input_size", "num_ids")


@dataclass
class TrainConfig:
    """Everything one stage run needs. Defaults are the reference's unless a comment says why not."""

    method: str = "pretrain"

    # model
    arch: str | None = None           # None: resnet50 on real data, mobilefacenet on synthetic
    feat_len: int | None = None       # None: 512, or the upstream checkpoint's
    input_size: int | None = None     # None: 112 on real data, the synthetic image size otherwise
    num_ids: int | None = None        # None: derived from the labeled data

    # losses
    s: float = 32.0
    m: float = 0.5
    dropout: float = 0.5              # on labeled features, virclass and virface only
    gen_num: int = 5
    KL: float = 2.0
    L2: float = 5e3
    overlap_threshold: float | None = None   # None: filter off; the reference's value is 0.8
    optim_mode: str = "alternate"     # virface only: alternate G / backbone steps, or one optimiser

    # batches
    label_batch_size: int = 128       # global, split evenly over ranks
    unlabel_batch_size: int = 128     # global, split evenly over ranks
    steps_per_epoch: int | None = None   # cap; None: max over both sets of ceil(N / batch)

    # optimisation
    lr: float = 0.1
    g_lr: float | None = None         # generator lr; None: same as lr
    momentum: float = 0.9
    weight_decay: float = 1e-3        # not applied to BatchNorm, PReLU or bias parameters
    decay_steps: tuple[int, ...] = (8, 12, 15, 18)
    gamma: float = 0.1
    max_epoch: int = 10               # exactly this many epochs (the reference ran one extra)
    amp: str = "none"                 # bf16/fp16 autocast, CUDA only

    # data
    labeled: str | None = None
    labeled_root: str | None = None
    unlabeled: str | None = None
    unlabeled_root: str | None = None
    val: dict[str, str] = field(default_factory=dict)
    synthetic: dict[str, Any] = field(default_factory=dict)   # overrides of SyntheticSpec
    strict_data: bool = False
    loader_workers: int = 2

    # run
    snapshot_prefix: str | None = None   # run folder; None: runs/<method>
    resume_file: str | None = None
    pretrained_file: str | None = None
    best_metric: str | None = None       # None: the hardest val set's accuracy
    eval: bool = True
    tensorboard: bool = True
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        self.decay_steps = tuple(int(x) for x in self.decay_steps)
        self.val = dict(self.val)
        self.synthetic = dict(self.synthetic)
        self.validate()

    @property
    def uses_synthetic(self) -> bool:
        return self.labeled is None

    @property
    def uses_unlabeled(self) -> bool:
        return self.method in ("virclass", "virface")

    def validate(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("optim_mode", self.optim_mode, OPTIM_MODES)
        _choice("amp", self.amp, AMP_MODES)
        for name in ("label_batch_size", "max_epoch", "loader_workers"):
            _positive_int(name, getattr(self, name), allow_zero=(name == "loader_workers"))
        _positive_int("unlabel_batch_size", self.unlabel_batch_size, allow_zero=not self.uses_unlabeled)
        _positive_int("gen_num", self.gen_num, allow_zero=True)
        for name in ("steps_per_epoch", "num_ids", "input_size", "feat_len"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.input_size is not None and self.input_size % 16:
            raise ConfigError(f"input_size: {self.input_size} is not divisible by 16 "
                              "(the backbones halve it four times)")
        for name in ("s", "lr", "gamma", "L2", "KL"):
            _non_negative(name, getattr(self, name), strict=name in ("s", "lr", "gamma"))
        if self.g_lr is not None:
            _non_negative("g_lr", self.g_lr, strict=True)
        _non_negative("weight_decay", self.weight_decay)
        if not 0.0 <= self.m < 3.14159:
            raise ConfigError(f"m: {self.m} is outside [0, pi)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: {self.dropout} is outside [0, 1)")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum: {self.momentum} is outside [0, 1)")
        if self.overlap_threshold is not None and not 0.0 < self.overlap_threshold <= 1.0:
            raise ConfigError(f"overlap_threshold: {self.overlap_threshold} is outside (0, 1]")
        if any(b <= 0 for b in self.decay_steps) or list(self.decay_steps) != sorted(self.decay_steps):
            raise ConfigError(f"decay_steps: {list(self.decay_steps)} must be increasing positive epochs")
        if self.unlabeled is not None and self.labeled is None:
            raise ConfigError("unlabeled: given without labeled data; give --labeled too, or "
                              "neither for the built-in synthetic faces")
        if self.resume_file and self.pretrained_file:
            raise ConfigError("resume_file and pretrained_file are exclusive: resume restores "
                              "everything, pretrained loads the models only")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["decay_steps"] = list(self.decay_steps)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "config") -> "TrainConfig":
        """Build from a mapping, rejecting unknown keys with the list of known ones."""
        return dataclass_from_dict(cls, values, where)

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def dataclass_from_dict(cls, values: Mapping[str, Any], where: str):
    """``cls(**values)`` for a config dataclass, with unknown keys named (not a TypeError)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**dict(values))


def config_field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {list(allowed)}")


def _positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ConfigError(f"{name}: {value!r} must be an integer >= {0 if allow_zero else 1}")


def _non_negative(name: str, value: Any, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (strict and value == 0):
        raise ConfigError(f"{name}: {value!r} must be a number {'>' if strict else '>='} 0")
