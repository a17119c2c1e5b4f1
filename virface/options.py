"""Command-line options generated from config dataclasses.

Each field of a config dataclass (``TrainConfig``, ``SearchOptions``) carries its help text and
option group as metadata (see :func:`virface.config.setting`); :func:`add_dataclass_options` turns
the fields into argparse options, so a setting's name, type, default and help are written once.

Conventions, the same for ``virface-train`` and ``virface-search``:
- the option is the field name in snake_case (``--label_batch_size``, as the reference and the
  YAML keys spell it); the kebab-case spelling (``--label-batch-size``) is accepted too, and
  ``--help`` shows one spelling with the default;
- options the user did not give are absent from the parsed namespace (argparse.SUPPRESS), so
  callers can tell a given value from a default (a resumed run keeps its checkpoint's settings
  unless one is given);
- ``bool`` fields are ``--x`` / ``--no-x``; tuples take several values (``--decay_steps 8 12``);
  ``dict`` fields are repeatable ``NAME=VALUE`` options, and a name given twice is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, Iterable

import yaml


def line_buffered_output() -> None:
    """Progress reaches a pipe or a log file (``virface-search ... | tee search.log``, ``nohup``,
    a cluster's job log) line by line, as on a terminal: Python block-buffers an output that is
    not a terminal, and an hour-long search would show nothing until it ended. Called by each
    entry point's ``main``, never on import."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """One spelling per option in ``--help`` (aliases are accepted, not listed)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        if isinstance(action, argparse.BooleanOptionalAction):
            return "--[no-]" + action.option_strings[0][2:]
        name = action.option_strings[0]
        if action.nargs == 0:
            return name
        return f"{name} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


def kebab(option: str) -> str:
    return option.replace("_", "-")


def option_names(name: str, aliases: Iterable[str] = ()) -> list[str]:
    """``--snake_name`` first (shown), then ``--kebab-name`` and any aliases (accepted)."""
    names = [f"--{name}"]
    for alias in (f"--{kebab(name)}", *aliases):
        if alias not in names:
            names.append(alias)
    return names


def parse_key_value(text: str, option: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> ``(NAME, VALUE)``, with an argparse error naming the option."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{option} must look like NAME=VALUE, got {text!r}")
    key, value = (part.strip() for part in text.split("=", 1))
    if not key:
        raise argparse.ArgumentTypeError(f"{option} {text!r}: the name before '=' is empty")
    return key, value


class KeyValueAction(argparse.Action):
    """Collects repeated ``NAME=VALUE`` options into a dict; a repeated NAME is an error."""

    def __init__(self, *args, parse_value=None, **kwargs):
        self.parse_value = parse_value or (lambda text: text)
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            key, text = parse_key_value(values, option_string or self.dest)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
        current = dict(getattr(namespace, self.dest, None) or {})
        if key in current:
            parser.error(f"{option_string}: {key!r} is given twice ({current[key]!r} and {text!r})")
        current[key] = self.parse_value(text)
        setattr(namespace, self.dest, current)


def _yaml_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def _default_text(field: dataclasses.Field) -> str | None:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return None
    if value is None or value == {}:
        return None                      # the help says what "not given" means
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return str(value)


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``tuple[int, ...]`` -> tuple[int, ...]."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return args[0] if len(args) == 1 else str
    return annotation


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type,
                          names: Iterable[str] | None = None,
                          groups: dict[str, argparse._ArgumentGroup] | None = None) -> list[str]:
    """Add one option per field of ``cls`` (only ``names`` if given); returns the field names.

    Defaults are not stored in the namespace (SUPPRESS) but shown in the help text.
    ``groups`` maps a group title to an argument group, shared across calls.
    """
    hints = typing.get_type_hints(cls)
    groups = {} if groups is None else groups
    wanted = None if names is None else set(names)
    added = []
    for field in dataclasses.fields(cls):
        if (wanted is not None and field.name not in wanted) or "help" not in field.metadata:
            continue
        meta = field.metadata
        title = meta.get("group", "options")
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        help_text = meta["help"]
        default = _default_text(field)
        if default is not None:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS,
                                  "help": help_text.replace("%", "%%")}
        for key in ("choices", "metavar", "required"):
            if key in meta:
                kwargs[key] = meta[key]
        kind = _base_type(hints[field.name])
        origin = typing.get_origin(kind)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            kwargs.update(nargs="+", type=typing.get_args(kind)[0])
            kwargs.setdefault("metavar", "N")
        elif origin is dict or kind is dict:
            value_type = typing.get_args(kind)[1] if typing.get_args(kind) else str
            kwargs.update(action=KeyValueAction,
                          parse_value=_yaml_scalar if value_type is Any else None)
        elif kind in (int, float, str):
            kwargs["type"] = kind
            if "choices" not in kwargs:
                kwargs.setdefault("metavar", {int: "N", float: "X", str: "TEXT"}[kind])
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: no command-line form for {kind!r}")
        group.add_argument(*option_names(field.name, meta.get("aliases", ())), **kwargs)
        added.append(field.name)
    return added


def given_options(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options among ``names`` that were given on the command line."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}
