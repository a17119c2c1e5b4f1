"""Search spaces: one YAML file per stage, validated on load, turned into an Optuna search.

A file names the metric, the searcher, the scheduler, the budget, the resources per trial, the
``fixed`` TrainConfig fields every trial shares and the ``parameters`` Optuna samples::

    metric: {name: cfp_fp_acc, mode: max}     # optional: the hardest pair set's accuracy
    selection: mean_last:3                    # optional: best (default), last or mean_last:K
    searcher: {type: tpe, seed: 0, n_startup_trials: 4}    # any TPESampler argument
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # any ASHAScheduler argument
    budget: {num_samples: 6, time_budget_s: null, max_concurrent_trials: 1}
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    fixed: {max_epoch: 3}
    parameters:
      KL: {type: float, low: 0.1, high: 10.0, log: true}     # first trial: TrainConfig's KL
      optim_mode: {type: categorical, choices: [alternate, joint]}
      g_lr: {type: float, low: 1.0e-3, high: 0.3, log: true, default: 0.1,
             when: {optim_mode: alternate}}

Several objectives (a Pareto front, see virface.search.pareto) are a list; cost metrics
(params, macs, latency_ms) are measured by each trial, and ``select`` picks the front's trial
whose checkpoint goes on (default: the best on the first accuracy/loss objective)::

    metric: [{mode: max}, {name: latency_ms, mode: min}]   # an entry without name: the default
    select: {maximize: synth_cfp_fp_acc, where: {latency_ms: {max: 5}}}
    scheduler: {type: none}                                 # ASHA stops trials on one metric

Parameters are Optuna distributions (FloatDistribution, IntDistribution, CategoricalDistribution),
samplers are Optuna's (``searcher.type``: tpe, random, qmc, gp, nsga2; the other keys are the
sampler's own arguments) and the scheduler is Ray Tune's ASHA (its own arguments), so their own
checks apply. This module adds what they lack: errors that read
``search_spaces/virface.yaml:12: parameters.KL.low: ...`` (file, line, key path, what is allowed),
reported before any trial starts; ``when:`` conditions; and the first trial, which takes each
parameter's ``default`` (else TrainConfig's default).

The search is define-by-run (:meth:`SearchSpace.define_by_run`) because that is the form of
Ray's ``OptunaSearch`` in which conditional parameters work; the ``fixed`` fields are returned
from it as constants, which Ray merges into each trial's config.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from virface.config import METHODS, TEST_PREFIX, TrainConfig, config_field_names, inherited_fields
from virface.errors import ConfigError
from virface.fileio import read_text
from virface.selection import DEFAULT_RULE, RULE_SPELLINGS, parse_rule
from virface.metrics import COST_METRICS, METRIC_MODES, metric_mode, selection_metric, stage_metric_names
from virface.stage_table import stage_spec

PARAMETER_TYPES = ("float", "int", "categorical")
SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "qmc": optuna.samplers.QMCSampler,
    "gp": optuna.samplers.GPSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}
SCHEDULER_TYPES = ("asha", "none")
# ASHA arguments the search sets itself: epochs are its time, max_t is the stage's max_epoch.
_SCHEDULER_SET_BY_SEARCH = ("time_attr", "metric", "mode", "max_t")

_TOP_LEVEL_KEYS = ("metric", "selection", "select", "searcher", "scheduler", "budget", "resources", "fixed", "parameters")
_SELECT_KEYS = ("maximize", "minimize", "where")
_BOUND_KEYS = ("min", "max")
_PARAMETER_KEYS = ("type", "low", "high", "log", "step", "choices", "default", "when")
_RANGE_ONLY_KEYS = ("low", "high", "log", "step")
# Fields a search space cannot set: the stage decides the method, and the runner sets the
# per-trial paths (the upstream checkpoint goes in as pretrained_file).
_RESERVED_FIELDS = {
    "method": "set by the stage ({stage})",
    "pretrained_file": "set by the search runner (the upstream checkpoint)",
    "resume_file": "set by the search runner",
    "snapshot_prefix": "set by the search runner (each trial has its own folder)",
    "selection": "set by the top-level 'selection' key (e.g. selection: mean_last:3)",
}

# A key path such as ("parameters", "KL", "low") or ("parameters", "s", "choices", 2).
_KeyPath = tuple


# ----------------------------------------------------------------------------------------------
# The parsed form


@dataclass(frozen=True)
class MetricSpec:
    name: str | None = None   # None: follow the data (see _parse_metric)
    mode: str | None = None   # "max" | "min"; None: from the name
    where: str = ""           # "file:line" of its entry, for errors found once the data is known


@dataclass(frozen=True)
class SelectSpec:
    """Which trial of a Pareto front passes its checkpoint on: the best ``metric`` (None: the
    stage's selection metric) in ``mode`` (None: the metric's own) among the trials inside every
    bound (metric -> (min, max), either end None)."""

    metric: str | None = None
    mode: str | None = None
    bounds: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    where: str = ""           # "file:line" of the select key


@dataclass(frozen=True)
class SearcherSpec:
    """An Optuna sampler: ``SAMPLERS[type](**arguments)``."""

    type: str = "tpe"
    arguments: dict[str, Any] = field(default_factory=lambda: {"seed": 0})

    def make(self):
        return SAMPLERS[self.type](**self.arguments)


@dataclass(frozen=True)
class SchedulerSpec:
    """Ray Tune's ASHA with these arguments (``type: none``: every trial runs every epoch)."""

    type: str = "asha"
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def grace_period(self) -> int:
        return int(self.arguments.get("grace_period", 1))


@dataclass(frozen=True)
class BudgetSpec:
    num_samples: int = 10
    time_budget_s: float | None = None
    max_concurrent_trials: int | None = 1   # None: as many as the resources allow


@dataclass(frozen=True)
class ResourcesSpec:
    workers: int = 1               # DDP ranks per trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass(frozen=True)
class Parameter:
    """One searched TrainConfig field: an Optuna distribution, the first trial's value and the
    conditions under which it is sampled (``when``: an earlier parameter's name -> the values it
    must take; all must hold; empty means always)."""

    name: str
    distribution: BaseDistribution
    default: Any = None
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return {FloatDistribution: "float", IntDistribution: "int",
                CategoricalDistribution: "categorical"}[type(self.distribution)]

    def applies(self, values: Mapping[str, Any]) -> bool:
        """Whether this parameter is sampled, given the values sampled before it."""
        return all(name in values and any(_same_value(values[name], v) for v in allowed)
                   for name, allowed in self.when.items())

    def suggest(self, trial: Any) -> Any:
        """Ask an ``optuna.Trial`` (or Ray's wrapper around one) for this parameter's value."""
        d = self.distribution
        if isinstance(d, FloatDistribution):
            return trial.suggest_float(self.name, d.low, d.high, step=d.step, log=d.log)
        if isinstance(d, IntDistribution):
            return trial.suggest_int(self.name, d.low, d.high, step=d.step, log=d.log)
        return trial.suggest_categorical(self.name, list(d.choices))

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return any(_same_value(value, c) for c in d.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(d, IntDistribution) and not isinstance(value, int):
            return False
        if not d.low <= value <= d.high:
            return False
        if d.step is not None:
            k = (value - d.low) / d.step
            return abs(k - round(k)) < 1e-9
        return True

    def describe(self) -> str:
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return f"one of {list(d.choices)}"
        extra = f", step {d.step}" if d.step not in (None, 1) else (", log scale" if d.log else "")
        return f"{self.type} in [{d.low}, {d.high}]{extra}"

    def candidates(self) -> list[tuple[Any, _KeyPath]]:
        """The extreme values of the range (or every choice), with the key that gave each."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return [(c, ("choices", i)) for i, c in enumerate(d.choices)]
        return [(d.low, ("low",)), (d.high, ("high",))]


@dataclass
class SearchSpace:
    """A validated search for one stage. ``fixed`` holds TrainConfig fields shared by all trials."""

    path: str | None
    stage: str
    metric_name: str | None        # None until resolved against the data (resolve_metric)
    metric_mode: str | None
    searcher: SearcherSpec
    scheduler: SchedulerSpec
    budget: BudgetSpec
    resources: ResourcesSpec
    fixed: dict[str, Any]
    parameters: list[Parameter]
    metric_where: str = ""         # "file:line" of the metric key, for errors found later
    # Several objectives (metric: a list): a Pareto front, and the rule that picks from it.
    # metric_name/metric_mode are then the first objective that is not a cost metric: what picks
    # each trial's best epoch and what its checkpoints are kept by.
    objectives: tuple[MetricSpec, ...] = ()
    select: SelectSpec | None = None
    # How each trial's value is taken from its epochs (virface.selection): what best_<metric>
    # holds, so what ASHA, TPE, the best-trial ranking and the manifest see.
    selection: str = DEFAULT_RULE

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def cost_metrics(self) -> list[str]:
        """The cost metrics the trials must measure (those named as objectives)."""
        return [o.name for o in self.objectives if o.name in COST_METRICS]

    def objective_list(self):
        """The resolved objectives as ``virface.search.pareto.Objective`` (after resolve_metric)."""
        from virface.search.pareto import Objective

        return [Objective(o.name, o.mode) for o in self.objectives]

    def select_rule(self):
        """The resolved select rule (``virface.search.pareto.SelectRule``), after resolve_metric."""
        from virface.search.pareto import SelectRule

        spec = self.select or SelectSpec()
        metric = spec.metric or self.metric_name
        mode = spec.mode or next((o.mode for o in self.objectives if o.name == metric), self.metric_mode)
        return SelectRule(metric, mode, dict(spec.bounds))

    @property
    def parameter_names(self) -> list[str]:
        return [p.name for p in self.parameters]

    @property
    def max_epochs(self) -> int:
        """The most epochs one trial can run (ASHA's ``max_t``)."""
        for p in self.parameters:
            if p.name == "max_epoch":
                d = p.distribution
                return int(max(d.choices) if isinstance(d, CategoricalDistribution) else d.high)
        return int(self.fixed.get("max_epoch", TrainConfig.max_epoch))

    def resolve_metric(self, pair_set_names: list[str]) -> "SearchSpace":
        """This space with its metric named and its mode set, for data with these pair sets.

        Without a name in the file, the metric is what ``virface-train`` selects best.pt by (the
        hardest pair set's accuracy; gen_loss for the generator). A named metric the stage cannot
        report with this data is a ConfigError listing the metrics it would report.
        """
        if self.objectives:
            return self._resolve_objectives(pair_set_names)
        name, mode = self._resolve_one(self.metric_name, self.metric_where, "metric", pair_set_names)
        return dataclasses.replace(self, metric_name=name, metric_mode=self.metric_mode or mode)

    def _resolve_one(self, name: str | None, where: str, key: str,
                     pair_set_names: list[str]) -> tuple[str, str]:
        available = stage_metric_names(self.stage, pair_set_names)
        if name is None:
            if self.fixed.get("eval") is False and stage_spec(self.stage).default_metric is None:
                raise ConfigError(f"{where}: {key}: eval is off, so no pair-set "
                                  f"accuracy exists to select on; name a metric (one of {available})")
            return selection_metric(self.stage, pair_set_names, True)
        if name.startswith(TEST_PREFIX):
            raise ConfigError(f"{where}: {key}.name: {name!r} is a --test pair set's "
                              f"metric; test pairs are reported, never selected on; select on "
                              f"a --val set (one of {available})")
        if name not in available:
            close = difflib.get_close_matches(name, available, n=3)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            given = (f"pair sets {pair_set_names}" if pair_set_names
                     else "no pair sets (give --val NAME=PATH)")
            raise ConfigError(
                f"{where}: {key}.name: {name!r}{hint} is not a metric of stage "
                f"{self.stage} with {given}; it reports {available}; or leave {key}.name "
                f"out to select on the hardest pair set's accuracy")
        return name, metric_mode(name)

    def _resolve_objectives(self, pair_set_names: list[str]) -> "SearchSpace":
        resolved: list[MetricSpec] = []
        for i, o in enumerate(self.objectives):
            if o.name in COST_METRICS:
                resolved.append(MetricSpec(o.name, "min", o.where))
                continue
            name, mode = self._resolve_one(o.name, o.where, f"metric[{i}]", pair_set_names)
            if any(r.name == name for r in resolved):
                raise ConfigError(f"{o.where}: metric[{i}]: {name!r} is already an objective "
                                  f"(an entry without a name stands for it with this data)")
            resolved.append(MetricSpec(name, o.mode or mode, o.where))
        primary = next(o for o in resolved if o.name not in COST_METRICS)
        names = [o.name for o in resolved]
        if self.select is not None:
            for key, name in ([("maximize" if self.select.mode == "max" else "minimize", self.select.metric)]
                              + [(f"where.{n}", n) for n in self.select.bounds]):
                if name is not None and name not in names:
                    close = difflib.get_close_matches(name, names, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ConfigError(f"{self.select.where}: select.{key}: {name!r}{hint} is not an "
                                      f"objective; the front is over {names}")
        return dataclasses.replace(self, objectives=tuple(resolved), metric_name=primary.name,
                                   metric_mode=primary.mode)

    def define_by_run(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run function for ``OptunaSearch(space=space.define_by_run)``.

        Suggests each parameter whose ``when`` holds, in file order, and returns the ``fixed``
        fields, which Ray's OptunaSearch merges into the trial config as constants.
        """
        values: dict[str, Any] = {}
        for p in self.parameters:
            if p.applies(values):
                values[p.name] = p.suggest(trial)
        return copy.deepcopy(self.fixed)

    def points_to_evaluate(self) -> list[dict[str, Any]]:
        """``[first trial]``: each parameter's default (the YAML's, else TrainConfig's), so the
        search starts from a known configuration. Conditional parameters whose condition fails
        under the defaults are left out."""
        point: dict[str, Any] = {}
        for p in self.parameters:
            if p.applies(point):
                point[p.name] = p.default
        return [point] if point else []

    def make_sampler(self):
        """The Optuna sampler the file asks for (seeded: 0 unless the file says otherwise). Pass
        it to ``OptunaSearch(sampler=...)``; Ray ignores OptunaSearch's own ``seed`` beside it."""
        return self.searcher.make()

    def make_scheduler(self, metric: str | None = None, mode: str | None = None):
        """Ray Tune's scheduler for this space, counting epochs, or None (``type: none``). A
        grace period longer than a shortened run (``--budget smoke``) is cut to the run."""
        if self.scheduler.type == "none":
            return None
        from ray.tune.schedulers import ASHAScheduler

        arguments = dict(self.scheduler.arguments)
        arguments["grace_period"] = min(self.scheduler.grace_period, self.max_epochs)
        return ASHAScheduler(time_attr="epoch", max_t=self.max_epochs, metric=metric, mode=mode,
                             **arguments)

    def describe(self) -> dict[str, Any]:
        """Everything that decides which trials run, as plain JSON values (no file path): what a
        resumed search must still agree with."""
        extra = {}
        if self.selection != DEFAULT_RULE:     # left out at the default: older records still match
            extra["selection"] = self.selection
        if self.objectives:
            extra.update(objectives=[[o.name, o.mode] for o in self.objectives],
                         select=self.select_rule().to_dict() if self.metric_name else None)
        return {**extra,
            "stage": self.stage, "metric": [self.metric_name, self.metric_mode],
            "searcher": {"type": self.searcher.type, **self.searcher.arguments},
            "scheduler": {"type": self.scheduler.type, **self.scheduler.arguments},
            "budget": dataclasses.asdict(self.budget), "resources": dataclasses.asdict(self.resources),
            "fixed": copy.deepcopy(self.fixed),
            "parameters": {p.name: {"distribution": repr(p.distribution), "default": p.default,
                                    "when": {k: list(v) for k, v in p.when.items()}}
                           for p in self.parameters},
        }

    def trial_config(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The TrainConfig fields of one trial: ``fixed`` overlaid with the sampled ``params``."""
        return {**copy.deepcopy(self.fixed), **dict(params)}


# ----------------------------------------------------------------------------------------------
# Entry points


# In a checkout the top-level search_spaces/ is the one users edit; an installed package carries
# a copy of it (setup.py copies it in at build time).
CHECKOUT_SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
PACKAGED_SPACES = Path(__file__).resolve().parent / "default_spaces"


def default_space_path(stage: str) -> Path:
    """Absolute path of ``search_spaces/<stage>.yaml``: the checkout's, else the installed copy."""
    if stage not in METHODS:
        raise ConfigError(f"stage: {stage!r} is not one of {list(METHODS)}")
    for folder in (CHECKOUT_SPACES, PACKAGED_SPACES):
        if (folder / f"{stage}.yaml").is_file():
            return folder / f"{stage}.yaml"
    raise ConfigError(f"no search space for stage {stage}: neither {CHECKOUT_SPACES} nor "
                      f"{PACKAGED_SPACES} holds {stage}.yaml (a broken install?); give --space")


def shipped_spaces() -> dict[str, Path]:
    """Every shipped search space by name (``pretrain_pareto`` -> its YAML file): the checkout's
    ``search_spaces/`` when there is one, else the installed package's copy."""
    for folder in (CHECKOUT_SPACES, PACKAGED_SPACES):
        found = {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}
        if found:
            return found
    return {}


def resolve_space(given: str | os.PathLike) -> Path:
    """The YAML file ``--space`` names: an existing file, else a shipped space's name
    (``pretrain_pareto``, or ``pretrain_pareto.yaml``). Anything else is an error listing the
    shipped names, also for a path into a checkout's ``search_spaces/`` that an installed package
    does not have (the shipped file of that name is what to give)."""
    path = Path(os.fspath(given)).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = shipped_spaces()
    name = path.name[:-len(".yaml")] if path.name.endswith(".yaml") else path.name
    if len(path.parts) == 1 and name in shipped:
        return shipped[name]
    hint = (f"; the shipped space {name!r} is --space {name}" if name in shipped
            else "")
    raise ConfigError(f"space: {os.fspath(given)!r} is neither a file nor a shipped search space"
                      f"{hint} (shipped: {', '.join(shipped) or 'none: a broken install?'}; "
                      f"virface-search --spaces lists them with their files)")


def load_search_space(path: str | os.PathLike, stage: str) -> SearchSpace:
    """Read and validate a search-space YAML file for ``stage`` (one of METHODS)."""
    where = os.fspath(path)
    text = read_text(path, "search space file", ConfigError)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: invalid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    ctx = _Context(where, _KeyLines(node))
    space = _parse(data, ctx, stage)
    space.path = os.path.abspath(where)
    return space


def parse_search_space(mapping: Any, where: str, stage: str) -> SearchSpace:
    """Validate an already-loaded mapping; errors name ``where`` and the key path (no line)."""
    return _parse(copy.deepcopy(mapping), _Context(where, _KeyLines(None)), stage)


# ----------------------------------------------------------------------------------------------
# YAML with line numbers


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` and ``5e3`` as floats (YAML 1.1 wants ``1.0e-3``),
    since learning rates are written that way and a string there would be a confusing error."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


class _KeyLines:
    """1-based line of every key path in a composed YAML document (nothing for plain dicts)."""

    def __init__(self, node: yaml.Node | None):
        self._lines: dict[_KeyPath, int] = {}
        self.duplicate: tuple[_KeyPath, int] | None = None
        if node is not None:
            self._walk(node, (), node.start_mark.line + 1)

    def _walk(self, node: yaml.Node, path: _KeyPath, line: int) -> None:
        self._lines[path] = line
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
                key_line = key_node.start_mark.line + 1
                if path + (key,) in self._lines and self.duplicate is None:
                    self.duplicate = (path + (key,), key_line)
                self._walk(value_node, path + (key,), key_line)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, path + (i,), item.start_mark.line + 1)

    def line(self, path: _KeyPath) -> int | None:
        """The line of ``path``, or of its nearest parent that exists (e.g. for missing keys)."""
        path = tuple(path)
        while path not in self._lines and path:
            path = path[:-1]
        return self._lines.get(path)


class _Context:
    def __init__(self, where: str, lines: _KeyLines):
        self.where = where
        self.lines = lines

    def error(self, path: _KeyPath, message: str) -> ConfigError:
        line = self.lines.line(path)
        location = f"{self.where}:{line}" if line is not None else self.where
        key = _format_path(path)
        return ConfigError(f"{location}: {key}: {message}" if key else f"{location}: {message}")


def _format_path(path: _KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ----------------------------------------------------------------------------------------------
# Validation


def _parse(data: Any, ctx: _Context, stage: str) -> SearchSpace:
    if stage not in METHODS:
        raise ConfigError(f"{ctx.where}: stage {stage!r} is not one of {list(METHODS)}")
    if ctx.lines.duplicate is not None:
        path, _ = ctx.lines.duplicate
        raise ctx.error(path, "duplicate key; each key may appear once")
    if data is None:
        raise ctx.error((), f"the search space is empty; expected a mapping with keys "
                            f"{list(_TOP_LEVEL_KEYS)}")
    if not isinstance(data, Mapping):
        raise ctx.error((), f"expected a mapping with keys {list(_TOP_LEVEL_KEYS)}, "
                            f"got {type(data).__name__}")
    _check_keys(ctx, (), data, _TOP_LEVEL_KEYS)
    objectives: tuple[MetricSpec, ...] = ()
    if isinstance(data.get("metric"), list):
        objectives = _parse_objectives(ctx, data["metric"])
        metric = next(o for o in objectives if o.name not in COST_METRICS)
    else:
        metric = _parse_metric(ctx, data.get("metric"))
    select = _parse_select(ctx, data.get("select"), len(objectives))
    fixed = _parse_fixed(ctx, data.get("fixed"), stage)
    parameters = _parse_parameters(ctx, data.get("parameters"), stage, fixed)
    line = ctx.lines.line(("metric",))
    space = SearchSpace(path=None, stage=stage, metric_name=metric.name, metric_mode=metric.mode,
                        searcher=_parse_searcher(ctx, data.get("searcher")),
                        scheduler=SchedulerSpec(), budget=_parse_budget(ctx, data.get("budget")),
                        resources=_parse_resources(ctx, data.get("resources")), fixed=fixed,
                        parameters=parameters, metric_where=f"{ctx.where}:{line}" if line else ctx.where,
                        objectives=objectives, select=select,
                        selection=_parse_selection(ctx, data.get("selection", DEFAULT_RULE)))
    space.scheduler = _parse_scheduler(ctx, data.get("scheduler"), space.max_epochs, len(objectives))
    _check_train_configs(ctx, space)
    return space


def _check_keys(ctx: _Context, path: _KeyPath, mapping: Mapping, allowed) -> None:
    for key in mapping:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), list(allowed), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ctx.error(path + (key,), f"unknown key{did_you_mean}; allowed keys: "
                                           f"{list(allowed)}")


def _section(ctx: _Context, key: str, value: Any, allowed=None) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        expected = f"a mapping with keys {list(allowed)}" if allowed else "a mapping"
        raise ctx.error((key,), f"expected {expected}, got {type(value).__name__} {value!r}")
    if allowed is not None:
        _check_keys(ctx, (key,), value, allowed)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(ctx: _Context, path: _KeyPath, value: Any, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < minimum:
        raise ctx.error(path, f"{value!r} must be an integer >= {minimum}"
                              + (" or null" if allow_none else ""))
    return value


def _number(ctx: _Context, path: _KeyPath, value: Any, minimum: float, strict: bool,
            allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not _is_number(value) or value < minimum or (strict and value == minimum):
        raise ctx.error(path, f"{value!r} must be a number {'>' if strict else '>='} {minimum}"
                              + (" or null" if allow_none else ""))
    return float(value)


def _choice(ctx: _Context, path: _KeyPath, value: Any, allowed) -> str:
    if value not in allowed:
        raise ctx.error(path, f"{value!r} is not one of {list(allowed)}")
    return value


def _parse_selection(ctx: _Context, value: Any) -> str:
    """``selection``: best, last or mean_last:K (virface.selection), in its one spelling."""
    try:
        return parse_rule(value, "selection").text
    except ConfigError:
        raise ctx.error(("selection",), f"{value!r} is not {RULE_SPELLINGS}") from None


def _parse_metric(ctx: _Context, value: Any) -> MetricSpec:
    """``metric`` is optional: without a name the search selects on what ``virface-train`` picks
    best.pt by (the hardest pair set's accuracy; gen_loss for the generator), resolved once the
    data is known. The mode defaults to min for losses and max otherwise."""
    if value is not None and not isinstance(value, Mapping):
        raise ctx.error(("metric",), f"expected a mapping {{name: ..., mode: max|min}} (or a list "
                                     f"of them: several objectives), got {value!r}")
    section = _section(ctx, "metric", value, ("name", "mode"))
    name = section.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ctx.error(("metric", "name"), f"{name!r} must be a non-empty metric name, or leave "
                                            "it out to select on the hardest pair set's accuracy")
    mode = section.get("mode")
    if mode is not None:
        mode = _choice(ctx, ("metric", "mode"), mode, METRIC_MODES)
    return MetricSpec(name, mode)


def _parse_objectives(ctx: _Context, value: list) -> tuple[MetricSpec, ...]:
    """``metric`` as a list: two or more objectives, each ``{name, mode}``; one entry may leave
    the name out (the data's default metric); a cost metric is minimised; at least one objective
    must be something training moves (an accuracy or a loss)."""
    if len(value) < 2:
        raise ctx.error(("metric",), "a list names several objectives (a Pareto front); for one, "
                                     "write a mapping {name: ..., mode: max|min}")
    parsed: list[MetricSpec] = []
    for i, entry in enumerate(value):
        path = ("metric", i)
        if not isinstance(entry, Mapping):
            raise ctx.error(path, f"expected a mapping {{name: ..., mode: max|min}}, got {entry!r}")
        _check_keys(ctx, path, entry, ("name", "mode"))
        name, mode = entry.get("name"), entry.get("mode")
        if name is not None and (not isinstance(name, str) or not name):
            raise ctx.error(path + ("name",), f"{name!r} must be a non-empty metric name")
        if mode is not None:
            mode = _choice(ctx, path + ("mode",), mode, METRIC_MODES)
        if name in COST_METRICS and mode == "max":
            raise ctx.error(path + ("mode",), f"{name} is a cost; it can only be minimised (mode: min)")
        if name is None and any(o.name is None for o in parsed):
            raise ctx.error(path, "only one objective may leave its name out (it stands for the "
                                  "data's default metric)")
        if name is not None and any(o.name == name for o in parsed):
            raise ctx.error(path + ("name",), f"{name!r} is listed twice")
        line = ctx.lines.line(path)
        parsed.append(MetricSpec(name, mode, f"{ctx.where}:{line}" if line else ctx.where))
    if all(o.name in COST_METRICS for o in parsed):
        raise ctx.error(("metric",), f"every objective is a cost ({[o.name for o in parsed]}); add "
                                     "an accuracy or a loss (an entry {mode: max} without a name "
                                     "is the data's default accuracy)")
    return tuple(parsed)


def _parse_select(ctx: _Context, value: Any, n_objectives: int) -> SelectSpec | None:
    """``select: {maximize|minimize: METRIC, where: {METRIC: {min: X, max: Y}}}``; only beside
    several objectives (it picks from their Pareto front). Metric names are checked against the
    objectives once the data is known (resolve_metric)."""
    if value is None:
        return None
    if n_objectives < 2:
        raise ctx.error(("select",), "select picks a trial from a Pareto front; give metric as a "
                                     "list of two or more objectives")
    section = _section(ctx, "select", value, _SELECT_KEYS)
    if "maximize" in section and "minimize" in section:
        raise ctx.error(("select", "minimize"), "give one of maximize or minimize, not both")
    metric, mode = None, None
    for key, direction in (("maximize", "max"), ("minimize", "min")):
        if key in section:
            metric, mode = section[key], direction
            if not isinstance(metric, str) or not metric:
                raise ctx.error(("select", key), f"{metric!r} must be a metric name")
    where = section.get("where") or {}
    if not isinstance(where, Mapping):
        raise ctx.error(("select", "where"), f"expected a mapping of metric -> {{min: X, max: Y}}, "
                                             f"got {where!r}")
    bounds = {}
    for name, limits in where.items():
        path = ("select", "where", name)
        if not isinstance(limits, Mapping) or not limits:
            raise ctx.error(path, f"expected {{min: X}}, {{max: Y}} or both, got {limits!r}")
        _check_keys(ctx, path, limits, _BOUND_KEYS)
        for key in _BOUND_KEYS:
            if limits.get(key) is not None and not _is_number(limits[key]):
                raise ctx.error(path + (key,), f"{limits[key]!r} must be a number")
        low, high = (None if limits.get(k) is None else float(limits[k]) for k in _BOUND_KEYS)
        if low is not None and high is not None and low > high:
            raise ctx.error(path + ("min",), f"{low:g} is more than max {high:g}; no trial fits")
        bounds[str(name)] = (low, high)
    line = ctx.lines.line(("select",))
    return SelectSpec(metric, mode, bounds, f"{ctx.where}:{line}" if line else ctx.where)


def _arguments_of(ctx: _Context, path: _KeyPath, section: Mapping, target, exclude=()) -> dict:
    """``section`` minus ``type``, checked against ``target``'s keyword arguments."""
    accepted = [name for name, p in inspect.signature(target).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in exclude]
    arguments = {k: v for k, v in section.items() if k != "type"}
    _check_keys(ctx, path, arguments, ["type", *accepted])
    return arguments


def _parse_searcher(ctx: _Context, value: Any) -> SearcherSpec:
    section = _section(ctx, "searcher", value)
    kind = _choice(ctx, ("searcher", "type"), section.get("type", "tpe"), tuple(SAMPLERS))
    sampler = SAMPLERS[kind]
    arguments = _arguments_of(ctx, ("searcher",), section, sampler)
    if "seed" in inspect.signature(sampler).parameters:
        arguments.setdefault("seed", 0)          # reproducible unless the file says otherwise
    try:
        sampler(**arguments)
    except (TypeError, ValueError, ImportError) as exc:
        raise ctx.error(("searcher",), f"optuna.samplers.{sampler.__name__}({arguments}) fails: "
                                       f"{exc}") from None
    return SearcherSpec(kind, arguments)


def _parse_scheduler(ctx: _Context, value: Any, max_epochs: int, n_objectives: int = 0) -> SchedulerSpec:
    section = _section(ctx, "scheduler", value)
    # ASHA compares trials on one metric; with several objectives every trial runs to the end.
    default = "none" if n_objectives > 1 else "asha"
    kind = _choice(ctx, ("scheduler", "type"), section.get("type", default), SCHEDULER_TYPES)
    if kind == "asha" and n_objectives > 1:
        raise ctx.error(("scheduler", "type"), f"ASHA stops trials by one metric, and this search "
                                               f"has {n_objectives} objectives (metric is a list); "
                                               f"use scheduler: {{type: none}}")
    if kind == "none":
        _check_keys(ctx, ("scheduler",), section, ("type",))
        return SchedulerSpec("none", {})
    from ray.tune.schedulers import ASHAScheduler

    arguments = _arguments_of(ctx, ("scheduler",), section, ASHAScheduler, _SCHEDULER_SET_BY_SEARCH)
    if arguments.get("grace_period", 1) > max_epochs:
        raise ctx.error(("scheduler", "grace_period"),
                        f"{arguments['grace_period']} is more than the {max_epochs} epoch(s) a "
                        "trial runs (max_epoch); it must be <= max_epoch")
    try:
        ASHAScheduler(time_attr="epoch", max_t=max_epochs, **arguments)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ctx.error(("scheduler",), f"ASHAScheduler({arguments}) fails: {exc or 'invalid value'}") from None
    return SchedulerSpec("asha", arguments)


def _parse_budget(ctx: _Context, value: Any) -> BudgetSpec:
    s = _section(ctx, "budget", value, ("num_samples", "time_budget_s", "max_concurrent_trials"))
    d = BudgetSpec()
    return BudgetSpec(
        num_samples=_int(ctx, ("budget", "num_samples"), s.get("num_samples", d.num_samples), 1),
        time_budget_s=_number(ctx, ("budget", "time_budget_s"),
                              s.get("time_budget_s", d.time_budget_s), 0.0, strict=True,
                              allow_none=True),
        max_concurrent_trials=_int(ctx, ("budget", "max_concurrent_trials"),
                                   s.get("max_concurrent_trials", d.max_concurrent_trials), 1,
                                   allow_none=True))


def _parse_resources(ctx: _Context, value: Any) -> ResourcesSpec:
    s = _section(ctx, "resources", value, ("workers", "cpus_per_worker", "gpus_per_worker"))
    d = ResourcesSpec()
    return ResourcesSpec(
        workers=_int(ctx, ("resources", "workers"), s.get("workers", d.workers), 1),
        cpus_per_worker=_number(ctx, ("resources", "cpus_per_worker"),
                                s.get("cpus_per_worker", d.cpus_per_worker), 0.0, strict=True),
        gpus_per_worker=_number(ctx, ("resources", "gpus_per_worker"),
                                s.get("gpus_per_worker", d.gpus_per_worker), 0.0, strict=False))


def _check_field_name(ctx: _Context, path: _KeyPath, name: Any, stage: str, verb: str) -> None:
    fields = config_field_names()
    if not isinstance(name, str) or name not in fields:
        close = difflib.get_close_matches(str(name), fields, n=3)
        hint = f"; close matches: {close}" if close else f"; TrainConfig fields: {fields}"
        raise ctx.error(path, f"{name!r} is not a TrainConfig field{hint}")
    if name in _RESERVED_FIELDS:
        reason = _RESERVED_FIELDS[name].format(stage=stage)
        raise ctx.error(path, f"{name!r} is {reason}; it cannot be {verb}")
    if name in inherited_fields(stage):
        raise ctx.error(path, f"{name!r} is inherited from the upstream checkpoint; it cannot be "
                              f"{verb} in stage {stage} (inherited fields: {list(inherited_fields(stage))})")


def _parse_fixed(ctx: _Context, value: Any, stage: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ctx.error(("fixed",), f"expected a mapping of TrainConfig field -> value, "
                                    f"got {type(value).__name__}")
    for name in value:
        _check_field_name(ctx, ("fixed", name), name, stage, "fixed")
    return dict(value)


def _parse_parameters(ctx: _Context, value: Any, stage: str, fixed: Mapping[str, Any]) -> list[Parameter]:
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise ctx.error(("parameters",), f"expected a mapping of TrainConfig field -> "
                                         f"{{type: {'|'.join(PARAMETER_TYPES)}, ...}}, "
                                         f"got {type(value).__name__}")
    parsed: list[Parameter] = []
    for name, spec in value.items():
        path = ("parameters", name)
        _check_field_name(ctx, path, name, stage, "searched")
        if name in fixed:
            raise ctx.error(path, f"{name!r} is both fixed and searched; keep it in one of "
                                  "'fixed' or 'parameters'")
        parsed.append(_parse_parameter(ctx, path, name, spec, parsed, list(value)))
    return parsed


def _parse_parameter(ctx: _Context, path: _KeyPath, name: str, spec: Any,
                     earlier: list[Parameter], all_names: list[str]) -> Parameter:
    if not isinstance(spec, Mapping):
        raise ctx.error(path, f"expected a mapping {{type: {'|'.join(PARAMETER_TYPES)}, ...}}, "
                              f"got {spec!r}")
    _check_keys(ctx, path, spec, _PARAMETER_KEYS)
    if "type" not in spec:
        raise ctx.error(path, f"missing key 'type' (one of {list(PARAMETER_TYPES)})")
    kind = _choice(ctx, path + ("type",), spec["type"], PARAMETER_TYPES)
    distribution = (_categorical(ctx, path, spec) if kind == "categorical"
                    else _range(ctx, path, kind, spec))
    p = Parameter(name, distribution, when=_parse_when(ctx, path, spec.get("when"), name, earlier, all_names))
    if "default" in spec:
        default, where = spec["default"], path + ("default",)
        if kind == "float" and _is_number(default):
            default = float(default)
    else:
        # No default in the file: the first trial uses TrainConfig's own default.
        default, where = dataclasses.fields(TrainConfig)[config_field_names().index(name)].default, path
        if not p.contains(default):
            raise ctx.error(path, f"no default given, and TrainConfig's default {default!r} is not "
                                  f"a value of {name}: {p.describe()}; add default: to the parameter")
    if not p.contains(default):
        raise ctx.error(where, f"{default!r} is not a value of {name}: {p.describe()}")
    return dataclasses.replace(p, default=default)


def _categorical(ctx: _Context, path: _KeyPath, spec: Mapping) -> CategoricalDistribution:
    for key in _RANGE_ONLY_KEYS:
        if key in spec:
            raise ctx.error(path + (key,), "not allowed for a categorical parameter (it takes 'choices')")
    if "choices" not in spec:
        raise ctx.error(path, "missing key 'choices' (a list of at least two values)")
    choices = spec["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise ctx.error(path + ("choices",), f"{choices!r} must be a list of at least two "
                                             "values (put a single value in 'fixed')")
    for i, c in enumerate(choices):
        if not (c is None or isinstance(c, (str, bool)) or _is_number(c)):
            raise ctx.error(path + ("choices", i), f"{c!r} is not allowed; choices must be "
                                                   "strings, numbers, booleans or null")
        if any(_same_value(c, other) for other in choices[:i]):
            raise ctx.error(path + ("choices", i), f"{c!r} is listed twice")
    return CategoricalDistribution(choices)


def _range(ctx: _Context, path: _KeyPath, kind: str, spec: Mapping) -> BaseDistribution:
    if "choices" in spec:
        raise ctx.error(path + ("choices",), f"not allowed for a {kind} parameter (it takes "
                                             "low/high; use type: categorical for choices)")
    for key in ("low", "high"):
        if key not in spec:
            raise ctx.error(path, f"missing key {key!r} (a {kind} parameter needs low and high)")
    check, what = (_is_int, "an integer") if kind == "int" else (_is_number, "a finite number")
    for key in ("low", "high", "step"):
        if key in spec and not check(spec[key]):
            raise ctx.error(path + (key,), f"{spec[key]!r} must be {what}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ctx.error(path + ("log",), f"{log!r} must be true or false")
    distribution = FloatDistribution if kind == "float" else IntDistribution
    arguments = {"low": spec["low"], "high": spec["high"], "log": log}
    if "step" in spec:
        arguments["step"] = spec["step"]
    try:
        return distribution(**arguments)
    except ValueError as exc:     # Optuna's own checks: low <= high, log needs low > 0, ...
        message = str(exc)
        key = "step" if "step" in message else ("low" if "low" in message else "high")
        raise ctx.error(path + (key,), f"optuna.distributions.{distribution.__name__}: {message}") from None


def _parse_when(ctx: _Context, path: _KeyPath, when: Any, name: str,
                earlier: list[Parameter], all_names: list[str]) -> dict[str, tuple[Any, ...]]:
    if when is None:
        return {}
    path = path + ("when",)
    if not isinstance(when, Mapping) or not when:
        raise ctx.error(path, f"{when!r} must be a mapping of earlier parameter -> value "
                              "or list of values")
    by_name = {p.name: p for p in earlier}
    parsed = {}
    for ref, allowed in when.items():
        if ref not in by_name:
            if ref == name:
                reason = "a parameter cannot depend on itself"
            else:
                reason = ("it is defined later; a condition may only use parameters listed "
                          "before it (so conditions cannot form cycles)"
                          if ref in all_names else "it is not a searched parameter")
            raise ctx.error(path + (ref,), f"refers to {ref!r}, but {reason}; parameters "
                                           f"before {name!r}: {list(by_name)}")
        values = allowed if isinstance(allowed, list) else [allowed]
        if not values:
            raise ctx.error(path + (ref,), "an empty list never holds; give at least one value")
        for v in values:
            if not by_name[ref].contains(v):
                raise ctx.error(path + (ref,), f"{v!r} is not a value of {ref}: "
                                               f"{by_name[ref].describe()}")
        parsed[ref] = tuple(values)
    return parsed


def _same_value(a: Any, b: Any) -> bool:
    """Equality that keeps true apart from 1 (YAML readers rarely mean them as one value)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _check_train_configs(ctx: _Context, space: SearchSpace) -> None:
    """Build a TrainConfig from fixed + defaults, then once per range end or choice, so a value
    the trainer would reject fails here rather than in the middle of a search."""
    defaults = {p.name: p.default for p in space.parameters}
    base = {"method": space.stage, **space.fixed, **defaults}
    try:
        TrainConfig.from_dict(base)
    except ConfigError as e:
        raise ctx.error(_blame(str(e), space), f"fixed values and defaults do not make a valid "
                                               f"TrainConfig: {e}") from None
    for p in space.parameters:
        # A conditional parameter is checked where it applies: its conditions' first values.
        context = {**base, **{ref: allowed[0] for ref, allowed in p.when.items()}}
        for value, key in p.candidates():
            try:
                TrainConfig.from_dict({**context, p.name: value})
            except ConfigError as e:
                raise ctx.error(("parameters", p.name) + key,
                                f"{value!r} is not a valid {p.name}: {e}") from None


def _blame(message: str, space: SearchSpace) -> _KeyPath:
    """The key a TrainConfig error (``"m: 4 is outside ..."``) points at, for its line."""
    name = message.split(":", 1)[0].strip()
    if name in space.fixed:
        return ("fixed", name)
    if name in space.parameter_names:
        return ("parameters", name, "default")
    return ("fixed",) if space.fixed else ()
