"""Run configuration: one typed dataclass, validated on construction.

The field names follow the reference's ``train.py`` arguments (``label_batch_size``, ``gen_num``,
``KL``, ``L2``, ...) so that its users recognise them; the CLI (``virface-train``), the search
spaces' YAML keys and Python use the same names. Each field carries its help text and option
group as metadata, from which :mod:`virface.options` builds the command line, so a setting is
written down once. Configuration is data: nothing here is edited to configure a run.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from virface.errors import ConfigError
from virface.stage_table import STAGES

METHODS = tuple(STAGES)
OPTIM_MODES = ("alternate", "joint")
VI_GENERATORS = ("vae", "covariance")
GEN_TARGETS = ("class_centre", "same_identity")
AMP_MODES = ("none", "bf16", "fp16")

# What a later stage takes over from the checkpoint it starts from: the model's shape, chosen by
# the first stage, and what the generator's output means, chosen by the stage that first trains it.
MODEL_FIELDS = ("arch", "feat_len", "input_size", "num_ids")
GENERATOR_FIELDS = ("gen_residual", "gen_target")
INHERITED_FIELDS = MODEL_FIELDS + GENERATOR_FIELDS


def inherited_fields(stage: str) -> tuple[str, ...]:
    """The fields ``stage`` takes from its start checkpoint (setting them otherwise is an error)."""
    spec = STAGES[stage]
    return (() if spec.is_first else MODEL_FIELDS) + (GENERATOR_FIELDS if spec.needs_generator else ())
# Metrics of --test pair sets start with this: they are reported, never selected on.
TEST_PREFIX = "test_"

# Option groups, in the order ``--help`` lists them.
GROUP_MODEL, GROUP_LOSSES, GROUP_OPTIM = "model", "losses", "optimisation"
GROUP_DATA, GROUP_RUN = "data (none given: the built-in synthetic faces)", "run"


def setting(default: Any = dataclasses.MISSING, *, help: str, group: str,
            default_factory: Any = dataclasses.MISSING, **cli: Any) -> Any:
    """A dataclass field with its command-line description.

    ``help`` is the option's help text; ``group`` its ``--help`` section. Where the default is
    ``None`` the help says what None means. Extra keywords go to the option: ``choices``,
    ``metavar``, ``aliases`` (more option names), ``required``.
    """
    metadata = {"help": help, "group": group, **cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class ConfigDataclass:
    """``to_dict`` / ``from_dict`` for the config dataclasses (TrainConfig, SyntheticSpec):
    tuples become lists (JSON and YAML have no tuples); unknown keys are a named error."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "config"):
        """Build from a mapping, rejecting unknown keys with the list of known ones."""
        return dataclass_from_dict(cls, values, where)


@dataclass
class TrainConfig(ConfigDataclass):
    """Everything one stage run needs. Defaults are the reference's unless the help says why not."""

    method: str = setting("pretrain", group=GROUP_RUN, choices=METHODS,
                          help="the stage to train")

    # model
    arch: str | None = setting(
        None, group=GROUP_MODEL, metavar="NAME",
        help="backbone: resnet18..152, iresnet18..100, mobilefacenet, mobilefacenet_s, or "
             "module.path:callable (default: resnet50; mobilefacenet_s on the synthetic faces; "
             "downstream stages: the upstream checkpoint's)")
    feat_len: int | None = setting(None, group=GROUP_MODEL,
                                   help="embedding size (default: 512, or the upstream checkpoint's)")
    num_ids: int | None = setting(None, group=GROUP_MODEL,
                                  help="labeled identities; checked against the data (default: "
                                       "counted from the labeled data)")

    # losses
    s: float = setting(32.0, group=GROUP_LOSSES, help="ArcFace scale")
    m: float = setting(0.5, group=GROUP_LOSSES, help="ArcFace additive angular margin (radians)")
    dropout: float | None = setting(
        None, group=GROUP_LOSSES,
        help="dropout on labeled features before the softmax, in every stage that trains the "
             "backbone (default: the reference's: 0.5 in virclass and virface, none otherwise)")
    gen_num: int = setting(5, group=GROUP_LOSSES,
                           help="virtual instances drawn per unlabeled feature (virface)")
    KL: float = setting(2.0, group=GROUP_LOSSES, help="weight of the generator's KL term")
    L2: float = setting(5e3, group=GROUP_LOSSES, help="weight of the generator's MSE term")
    overlap_threshold: float | None = setting(
        None, group=GROUP_LOSSES,
        help="drop unlabeled samples whose max softmax over the labeled classes is >= this "
             "(default: off; the reference's value is 0.8)")
    optim_mode: str = setting("alternate", group=GROUP_LOSSES, choices=OPTIM_MODES,
                              help="virface: alternate G and backbone steps (the authors' "
                                   "scheme), or one joint optimiser (the reference code)")
    vi_weight: float = setting(1.0, group=GROUP_LOSSES,
                               help="virface: weight of the VirInstance loss L_vi")
    vi_warmup_epochs: float = setting(
        0.0, group=GROUP_LOSSES,
        help="virface: ramp L_vi's weight linearly from 0 over this many epochs (0: no warm-up)")
    vi_to_backbone: bool = setting(
        False, group=GROUP_LOSSES,
        help="virface, not the reference's: L_vi also reaches the backbone, through the "
             "generator's input (the generator itself stays frozen for L_vi)")
    gen_target_grad: bool = setting(
        False, group=GROUP_LOSSES,
        help="virface with --optim_mode joint: the generator's MSE also pulls W_y, exactly as the "
             "reference's single optimiser does (default: W_y is a fixed target)")
    gen_residual: bool | None = setting(
        None, group=GROUP_LOSSES,
        help="not the reference's: the generator draws u + delta (a residual on its input) "
             "instead of a free feature; chosen in the generator stage and inherited by virface "
             "(default: off, or the upstream generator's)")

    vi_centre_grad: bool = setting(
        False, group=GROUP_LOSSES,
        help="virface, not the reference's: the virtual centres in L_vi are not detached, so L_vi "
             "reaches the backbone through them (weight and warm-up: --vi_weight, "
             "--vi_warmup_epochs)")
    vi_gen_grad: bool = setting(
        False, group=GROUP_LOSSES,
        help="virface with --optim_mode alternate, not the reference's: the generator's step also "
             "takes L_vi's gradient (instances drawn before it; the centres and W fixed)")
    vi_generator: str = setting(
        "vae", group=GROUP_LOSSES, choices=VI_GENERATORS,
        help="virface: what draws the virtual instances: the trained generator (vae, the "
             "reference), or, not the reference's, covariance transfer: u + e, e ~ N(0, cov_scale^2 "
             "Sigma) with Sigma the pooled within-identity covariance of labeled features estimated "
             "at the start of the stage, renormalised (no training; the generator is left as loaded)")
    cov_rank: int = setting(0, group=GROUP_LOSSES,
                            help="covariance transfer: keep Sigma's top this many eigen-directions "
                                 "(0: the full covariance)")
    cov_scale: float = setting(1.0, group=GROUP_LOSSES,
                               help="covariance transfer: the noise's standard-deviation scale")
    cov_shrink: float = setting(
        0.0, group=GROUP_LOSSES,
        help="covariance transfer: move each source this fraction (0..1) of the way to its "
             "identity's estimated centre, mu + (I - Sigma Sigma_t^-1)(u - mu), before adding the "
             "noise (0: the source itself); zero-mean noise alone moves draws away from the identity")
    variation_images: int = setting(
        4096, group=GROUP_LOSSES,
        help="labeled images (whole identities of >= 2 images, spread over the data) whose "
             "within-identity variation covariance transfer estimates Sigma from and a "
             "same_identity generator is trained on")
    gen_target: str | None = setting(
        None, group=GROUP_LOSSES, choices=GEN_TARGETS,
        help="what the generator is trained towards: its class weight W_y (class_centre, the "
             "reference) or, not the reference's, another image of the same identity "
             "(same_identity: from the frozen backbone's features of the labeled data; use with "
             "--gen_residual and --gen_diversity); chosen in the generator stage and inherited; "
             "virface keeps a same_identity generator fixed (default: class_centre, or the "
             "upstream generator's)")
    gen_diversity: float = setting(
        0.0, group=GROUP_LOSSES,
        help="generator stage, not the reference's: weight of a term pulling the mean cosine "
             "between two draws from one source to the real same-identity cosine of as many "
             "pairs of labeled images (the frozen backbone's features of --variation_images "
             "images); 0: off")

    # optimisation
    label_batch_size: int = setting(128, group=GROUP_OPTIM,
                                    help="labeled images per step, global (split over ranks)")
    unlabel_batch_size: int = setting(128, group=GROUP_OPTIM,
                                      help="unlabeled images per step, global (split over ranks)")
    steps_per_epoch: int | None = setting(
        None, group=GROUP_OPTIM,
        help="cap on steps per epoch (default: one pass, max over both sets of ceil(N / batch))")
    lr: float = setting(0.1, group=GROUP_OPTIM, help="SGD learning rate")
    g_lr: float | None = setting(None, group=GROUP_OPTIM,
                                 help="the generator's learning rate (default: --lr)")
    momentum: float = setting(0.9, group=GROUP_OPTIM, help="SGD momentum")
    weight_decay: float = setting(1e-3, group=GROUP_OPTIM,
                                  help="weight decay; never on BatchNorm, PReLU or bias parameters")
    decay_steps: tuple[int, ...] = setting((8, 12, 15, 18), group=GROUP_OPTIM, metavar="EPOCH",
                                           help="epochs after which lr is multiplied by gamma")
    gamma: float = setting(0.1, group=GROUP_OPTIM, help="lr decay factor")
    max_epoch: int = setting(10, group=GROUP_OPTIM,
                             help="epochs to train (exactly; the reference ran one more)")
    amp: str = setting("none", group=GROUP_OPTIM, choices=AMP_MODES,
                       help="mixed precision (autocast), CUDA only")
    sample_rate: float | None = setting(
        None, group=GROUP_OPTIM,
        help="Partial FC (arcface_torch's name): the softmax over each batch's classes plus this "
             "fraction of the others, W sharded over the ranks; every virtual class always "
             "counts (default: the full softmax)")
    channels_last: bool = setting(
        True, group=GROUP_OPTIM,
        help="on CUDA, the backbone and its input in channels_last memory format (faster "
             "convolutions with tensor cores); ignored on CPU")
    compile: bool = setting(
        False, group=GROUP_OPTIM,
        help="torch.compile the backbone's training forward; an opt-in: its gain is not measured "
             "yet (no GPU was available; benchmarks/gpu_throughput.py --suite measures it)")

    # data
    labeled: str | None = setting(
        None, group=GROUP_DATA, metavar="PATH",
        help="labeled faces: train.rec (or its folder), a folder per identity, or a meta list "
             "(default: the built-in synthetic faces)")
    labeled_root: str | None = setting(
        None, group=GROUP_DATA, metavar="DIR",
        help="root of a meta list's relative paths (default: the list's folder)")
    unlabeled: str | None = setting(
        None, group=GROUP_DATA, metavar="PATH",
        help="unlabeled shallow faces, the same forms; labels ignored (default: none, or the "
             "synthetic faces' shallow split)")
    unlabeled_root: str | None = setting(None, group=GROUP_DATA, metavar="DIR",
                                         help="root of the unlabeled meta list's paths (default: the list's "
                                              "folder)")
    val: dict[str, str] = setting(
        default_factory=dict, group=GROUP_DATA, metavar="NAME=PATH",
        help="a verification pair set to evaluate and select on (best epoch, best trial): a .bin "
             "pack, an LFW folder (pairs.txt) or a CFP folder (name ending in _ff or _fp); "
             "repeatable (default: the synthetic faces' validation pair sets on synthetic data, "
             "none otherwise)")
    test: dict[str, str] = setting(
        default_factory=dict, group=GROUP_DATA, metavar="NAME=PATH",
        help="a pair set to evaluate and report as test_<NAME>_acc, never selected on; the same "
             "forms as --val; repeatable (default: the synthetic faces' test pair sets on "
             "synthetic data, none otherwise)")
    input_size: int | None = setting(
        None, group=GROUP_DATA,
        help="side of the square input, divisible by 16 (default: 112; the synthetic faces' size)")
    synthetic: dict[str, Any] = setting(
        default_factory=dict, group=GROUP_DATA, metavar="KEY=VALUE",
        help="override a field of the synthetic data spec, e.g. n_labeled_ids=100; repeatable "
             "(default: none)")
    strict_data: bool = setting(False, group=GROUP_DATA,
                                help="raise on a corrupt image instead of skipping and counting it")
    loader_workers: int = setting(2, group=GROUP_DATA,
                                  help="data-loader processes for image files (in-memory data uses none)")

    # run
    snapshot_prefix: str | None = setting(
        None, group=GROUP_RUN, metavar="DIR",
        help="run folder, never overwritten (default: runs/<method>; with --resume_file, the "
             "checkpoint's run folder)")
    resume_file: str | None = setting(None, group=GROUP_RUN, metavar="PT",
                                      help="a checkpoint of this stage to continue (default: none)")
    pretrained_file: str | None = setting(
        None, group=GROUP_RUN, metavar="PT", aliases=("--pretrain_file", "--pretrain-file"),
        help="an upstream stage's checkpoint to start from; loads the models only (default: none)")
    best_metric: str | None = setting(
        None, group=GROUP_RUN, metavar="METRIC",
        help="metric that picks best.pt (default: the hardest --val pair set's accuracy; "
             "generator: gen_loss)")
    selection: str = setting(
        "best", group=GROUP_RUN, metavar="RULE",
        help="how the run's value is taken from its epochs' best_metric: best (the best epoch), "
             "last, or mean_last:K (mean of the last K epochs); best.pt is the epoch the rule "
             "points to (the last one for last and mean_last:K)")
    log_every: int = setting(20, group=GROUP_RUN,
                             help="steps between progress lines and per-step TensorBoard points "
                                  "(0: none)")
    eval: bool = setting(True, group=GROUP_RUN, help="evaluate the pair sets after each epoch")
    diagnostic_pairs: int = setting(
        512, group=GROUP_RUN,
        help="generator and virface stages: same-identity pairs (of the --val sets; else of the "
             "labeled data) on which each epoch measures the virtual instances (vi_* metrics: "
             "draw spread, identity keep, nearest-W pull, own-class share); 0: none")
    tensorboard: bool = setting(True, group=GROUP_RUN, help="write TensorBoard events")
    device: str = setting("auto", group=GROUP_RUN, metavar="DEVICE",
                          help="auto, cpu, cuda, cuda:1, ... (auto: cuda when available)")
    seed: int = setting(0, group=GROUP_RUN, help="seed of weights, sampling and augmentation")

    def __post_init__(self):
        check_field_types(self)
        self.decay_steps = tuple(self.decay_steps)
        self.val = dict(self.val)
        self.test = dict(self.test)
        self.synthetic = dict(self.synthetic)
        self.validate()

    @property
    def uses_synthetic(self) -> bool:
        return self.labeled is None

    @property
    def resolved_dropout(self) -> float:
        """The labeled-feature dropout in effect (``dropout``, else the reference's choice)."""
        if self.dropout is not None:
            return self.dropout
        return 0.5 if self.uses_unlabeled else 0.0

    @property
    def uses_unlabeled(self) -> bool:
        return STAGES[self.method].uses_unlabeled

    @property
    def generator_fixed(self) -> bool:
        """A stage that starts from a trained generator keeps it as loaded: covariance transfer
        draws the instances instead, or a same_identity generator's target (the frozen
        backbone's features) no longer holds once the backbone trains."""
        spec = STAGES[self.method]
        return spec.needs_generator and (self.vi_generator == "covariance" or self.gen_target == "same_identity")

    def validate(self) -> None:
        _choice("method", self.method, tuple(STAGES))
        if self.arch is not None:
            from virface.backbones.registry import check_arch   # the registry imports torch

            check_arch(self.arch)
        _choice("optim_mode", self.optim_mode, OPTIM_MODES)
        _choice("amp", self.amp, AMP_MODES)
        _choice("vi_generator", self.vi_generator, VI_GENERATORS)
        if self.gen_target is not None:
            _choice("gen_target", self.gen_target, GEN_TARGETS)
        for name in ("cov_rank", "diagnostic_pairs"):
            _positive_int(name, getattr(self, name), allow_zero=True)
        _positive_int("variation_images", self.variation_images)
        _non_negative("cov_scale", self.cov_scale)
        if not 0.0 <= self.cov_shrink <= 1.0:
            raise ConfigError(f"cov_shrink: {self.cov_shrink!r} must be between 0 and 1")
        _non_negative("gen_diversity", self.gen_diversity)
        if self.vi_gen_grad and self.optim_mode != "alternate":
            raise ConfigError("vi_gen_grad: the joint optimiser already gives the generator L_vi's "
                              "gradient; vi_gen_grad is for optim_mode alternate")
        for name in ("label_batch_size", "max_epoch", "loader_workers", "log_every"):
            _positive_int(name, getattr(self, name), allow_zero=name in ("loader_workers", "log_every"))
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
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: {self.dropout} is outside [0, 1)")
        if self.sample_rate is not None and not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"sample_rate: {self.sample_rate} is outside (0, 1]")
        _non_negative("vi_weight", self.vi_weight)
        _non_negative("vi_warmup_epochs", self.vi_warmup_epochs)
        if self.gen_target_grad and self.optim_mode != "joint":
            raise ConfigError("gen_target_grad: letting the MSE pull W_y is the reference's joint "
                              "optimiser; it needs optim_mode joint (in alternate mode the "
                              "generator's step never updates W)")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum: {self.momentum} is outside [0, 1)")
        if self.overlap_threshold is not None and not 0.0 < self.overlap_threshold <= 1.0:
            raise ConfigError(f"overlap_threshold: {self.overlap_threshold} is outside (0, 1]")
        if any(b <= 0 for b in self.decay_steps) or list(self.decay_steps) != sorted(self.decay_steps):
            raise ConfigError(f"decay_steps: {list(self.decay_steps)} must be increasing positive epochs")
        for name in self.val:
            check_pair_set_name(name, "val")
            if name.startswith(TEST_PREFIX):
                raise ConfigError(f"val: {name!r}: a --val name may not start with {TEST_PREFIX!r}; "
                                  f"that prefix marks the --test pair sets' metrics")
        for name in self.test:
            check_pair_set_name(name, "test")
        if self.best_metric and self.best_metric.startswith(TEST_PREFIX):
            raise ConfigError(f"best_metric: {self.best_metric!r} is a test pair set's metric; test "
                              f"pair sets are reported, never selected on (use a --val set)")
        from virface.selection import parse_rule

        self.selection = parse_rule(self.selection, "selection").text
        if self.unlabeled is not None and self.labeled is None:
            raise ConfigError("unlabeled: given without labeled data; give --labeled too, or "
                              "neither for the built-in synthetic faces")
        if self.resume_file and self.pretrained_file:
            raise ConfigError("resume_file and pretrained_file are exclusive: resume restores "
                              "everything, pretrained loads the models only")

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def dataclass_from_dict(cls, values: Mapping[str, Any], where: str):
    """``cls(**values)`` for a config dataclass, with unknown keys named (not a TypeError)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**dict(values))


def config_field_names(group: str | None = None) -> list[str]:
    """TrainConfig's field names, in order; only those of one option ``group`` if given."""
    return [f.name for f in dataclasses.fields(TrainConfig)
            if group is None or f.metadata.get("group") == group]


def check_pair_set_name(name: str, option: str) -> None:
    """A pair-set name becomes metric names (``<name>_acc``) and TensorBoard tags: keep it plain."""
    if not name or not all(c.isalnum() or c in "_-." for c in name):
        raise ConfigError(f"{option}: pair-set name {name!r} must be non-empty and made of letters, "
                          f"digits, '_', '-' and '.' (it names the metrics, e.g. {name or 'lfw'}_acc)")


def _type_names(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_names(a) for a in args)
    if typing.get_origin(annotation) is tuple:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0], "values")
    if typing.get_origin(annotation) is dict or annotation is dict:
        return "a mapping"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number",
            str: "a string"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _fits(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float):   # numbers: an int is a float, a bool is neither
        return isinstance(value, (int, float) if annotation is float else int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check_field_types(config: Any) -> None:
    """Every field holds a value of its declared type (YAML and JSON can hand in anything):
    a ConfigError naming the field, what it holds and what it takes."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _fits(value, hints[f.name]):
            example = " (e.g. [8, 12])" if typing.get_origin(hints[f.name]) is tuple else ""
            raise ConfigError(f"{f.name}: {value!r} must be {_type_names(hints[f.name])}{example}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {list(allowed)}")


def _positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ConfigError(f"{name}: {value!r} must be an integer >= {0 if allow_zero else 1}")


def _non_negative(name: str, value: Any, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (strict and value == 0):
        raise ConfigError(f"{name}: {value!r} must be a number {'>' if strict else '>='} 0")
