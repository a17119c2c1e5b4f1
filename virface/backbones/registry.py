"""Backbone registry: every face backbone is built by name through one signature.

A builder is any callable ``(feat_len: int, input_size: int) -> nn.Module`` whose module maps a
float tensor ``(B, 3, input_size, input_size)`` to an embedding ``(B, feat_len)`` (not
L2-normalised, no classifier). Library builders register themselves with
``@register_backbone("name")``; a user architecture is named ``"module.path:callable"`` and needs
no registration, so users never edit library files to add one.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Callable

from torch import nn

from virface.errors import ConfigError

BackboneBuilder = Callable[..., nn.Module]

# The backbones halve the input four times; see check_input_size.
DOWNSAMPLE_FACTOR = 16

_BUILDERS: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator registering ``builder(feat_len, input_size) -> nn.Module`` under ``name``."""
    if not name or ":" in name:
        # ":" is reserved for the "module.path:callable" form of build_backbone.
        raise ConfigError(f"backbone name {name!r}: must be non-empty and contain no ':'")

    def decorator(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ConfigError(f"backbone name {name!r} is already registered "
                              f"(by {_BUILDERS[name].__module__}.{_BUILDERS[name].__qualname__})")
        _BUILDERS[name] = builder
        return builder

    return decorator


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_BUILDERS)


def check_input_size(input_size: int) -> None:
    """Raise ConfigError unless ``input_size`` is a positive multiple of 16."""
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise ConfigError(f"input_size: {input_size!r} is not a positive integer")
    if input_size % DOWNSAMPLE_FACTOR:
        raise ConfigError(f"input_size: {input_size} is not divisible by {DOWNSAMPLE_FACTOR} "
                          "(the backbones halve it four times)")


def _check_feat_len(feat_len: int) -> None:
    if isinstance(feat_len, bool) or not isinstance(feat_len, int) or feat_len <= 0:
        raise ConfigError(f"feat_len: {feat_len!r} is not a positive integer")


def build_backbone(name: str, feat_len: int = 512, input_size: int = 112) -> nn.Module:
    """Build the backbone ``name``: a module mapping ``(B, 3, input_size, input_size)`` float
    images to ``(B, feat_len)`` embeddings, not normalised.

    ``name`` is a registered name (see ``list_backbones()``) or ``"module.path:callable"``: the
    module is imported, the callable (a dotted attribute path is allowed) is called with
    ``feat_len=feat_len`` and, if its signature accepts it, ``input_size=input_size``, and must
    return an ``nn.Module``. Its output shape is the user's responsibility.

    Raises ConfigError for an unknown name, a module that cannot be imported, a missing or
    non-callable attribute, a callable that raises (naming it and its error), one that returns something other than an ``nn.Module``, and a
    ``feat_len`` or ``input_size`` that is not a positive integer (input_size: multiple of 16).
    """
    _check_feat_len(feat_len)
    check_input_size(input_size)
    check_arch(name)
    if ":" in name:
        return _build_user_backbone(name, feat_len, input_size)
    return _BUILDERS[name](feat_len=feat_len, input_size=input_size)


def check_arch(name: str) -> None:
    """ConfigError unless ``name`` is a registered backbone or an importable
    ``module.path:callable`` (checked without building it, so a search fails before it starts)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"arch: {name!r} is not a backbone name")
    if ":" in name:
        _user_callable(name)
        return
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, _BUILDERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"arch: unknown backbone {name!r}{hint}; registered backbones: "
                          f"{', '.join(list_backbones())}; or name a user architecture as "
                          "'module.path:callable'")


def _user_callable(spec: str):
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"arch: {spec!r} is not of the form 'module.path:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        # Covers both a missing module and a module whose own imports fail; e says which.
        raise ConfigError(f"arch: {spec!r}: cannot import module {module_name!r}: {e}") from e

    target = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"arch: {spec!r}: module {module_name!r} has no attribute "
                              f"{attr_path!r}") from None
    if not callable(target):
        raise ConfigError(f"arch: {spec!r}: {attr_path!r} is a {type(target).__name__}, "
                          "not a callable")
    return target


def _build_user_backbone(spec: str, feat_len: int, input_size: int) -> nn.Module:
    target = _user_callable(spec)
    kwargs: dict[str, int] = {"feat_len": feat_len}
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # some C callables have no signature; just try feat_len
        params = None
    if params is not None:
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if not takes_any and "feat_len" not in params:
            raise ConfigError(f"arch: {spec!r}: the callable must accept a 'feat_len' keyword "
                              f"argument; its signature is {inspect.signature(target)}")
        if takes_any or "input_size" in params:
            kwargs["input_size"] = input_size

    try:
        model = target(**kwargs)
    except Exception as exc:     # the user's code: name it and what it raised, not a traceback
        given = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise ConfigError(f"arch: {spec!r}: {spec.partition(':')[2]}({given}) raised "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"arch: {spec!r} returned a {type(model).__qualname__}, "
                          "not a torch.nn.Module")
    return model


def init_face_backbone(module: nn.Module) -> None:
    """The initialisation every face backbone here shares: He (fan-out) for convolutions, unit
    scale and zero shift for batch norms."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
