"""Search-space files: what loads, what is rejected (with file, line and key), and the Optuna
search they turn into."""
from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest

from virface.config import METHODS, TrainConfig
from virface.errors import ConfigError
from virface.search.space import (
    SearchSpace,
    default_space_path,
    load_search_space,
    parse_search_space,
    resolve_space,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load(tmp_path: Path, text: str, stage: str = "virface") -> SearchSpace:
    return load_search_space(write(tmp_path, text), stage)


# A small space with one conditional parameter, used by the sampling tests. Lines are numbered
# from 1 at "metric".
SMALL = """
metric: {name: acc, mode: max}
searcher: {type: random, seed: 3}
fixed: {max_epoch: 3, steps_per_epoch: 5}
parameters:
  gen_num: {type: int, low: 1, high: 10, default: 5}
  KL: {type: float, low: 0.1, high: 10.0, log: true, default: 2.0}
  m: {type: float, low: 0.2, high: 0.6, step: 0.1, default: 0.5}
  label_batch_size: {type: int, low: 16, high: 256, log: true, default: 128}
  optim_mode: {type: categorical, choices: [alternate, joint], default: alternate}
  g_lr: {type: float, low: 1e-3, high: 0.3, log: true, default: 0.1, when: {optim_mode: alternate}}
"""


# ---------------------------------------------------------------------------------------------
# The shipped files


def test_a_shipped_space_is_named_without_a_path_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given in ("pretrain_pareto", "pretrain_pareto.yaml"):
        path = resolve_space(given)
        assert path.is_absolute() and path.name == "pretrain_pareto.yaml"
        assert load_search_space(path, "pretrain").multi_objective


def test_a_file_of_the_same_name_in_the_working_folder_wins_over_the_shipped_space(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = write(tmp_path, "fixed: {max_epoch: 2}\nparameters: {lr: {type: float, low: 0.01, high: 0.1}}\n",
                 name="pretrain.yaml")
    assert resolve_space("pretrain.yaml") == mine.resolve()
    assert resolve_space("pretrain") == default_space_path("pretrain")


def test_a_checkout_path_that_is_not_here_names_the_shipped_space_to_give(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_space("search_spaces/pretrain_pareto.yaml")
    assert "--space pretrain_pareto" in str(err.value)
    with pytest.raises(ConfigError, match=r"'nope' is neither a file nor a shipped search space .*"
                                          r"shipped: baseline, generator, pretrain, pretrain_pareto"):
        resolve_space("nope")


def test_virface_search_spaces_lists_every_shipped_space_with_its_file(capsys):
    from virface.search.cli import main

    assert main(["--spaces"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("shipped search spaces")
    listed = {line.split()[0]: line.split()[1] for line in lines[1:]}
    shipped = sorted(p.stem for p in default_space_path("pretrain").parent.glob("*.yaml"))
    assert sorted(listed) == shipped
    assert listed["pretrain_pareto"] == str(default_space_path("pretrain").parent / "pretrain_pareto.yaml")
    assert [line for line in lines if "(the default of --stage" in line] == \
        [line for line in lines if line.split()[0] in METHODS]


@pytest.mark.parametrize("stage", METHODS)
def test_every_shipped_search_space_loads_and_starts_from_its_defaults(stage):
    path = default_space_path(stage)
    assert path.is_absolute() and path.name == f"{stage}.yaml"
    space = load_search_space(path, stage)
    assert space.stage == stage and space.parameters
    assert space.budget.max_concurrent_trials == 1 and space.resources.workers == 1
    # Every parameter has a default, so the first trial is the reference configuration.
    [point] = space.points_to_evaluate()
    assert set(point) == {p.name for p in space.parameters if p.applies(point)}


def test_shipped_spaces_name_no_metric_so_it_follows_the_data():
    spaces = {s: load_search_space(default_space_path(s), s) for s in METHODS}
    # The generator's names identity keep (issue 18): gen_loss rewards instances pulled onto W.
    assert all(space.metric_name is None for s, space in spaces.items() if s != "generator")
    assert (spaces["generator"].metric_name, spaces["generator"].metric_mode) == ("vi_identity_keep", "max")
    synthetic = ["synth_lfw", "synth_cfp_ff", "synth_cfp_fp"]
    resolved = {s: (sp.resolve_metric(synthetic).metric_name, sp.resolve_metric(synthetic).metric_mode)
                for s, sp in spaces.items()}
    assert resolved == {"pretrain": ("synth_cfp_fp_acc", "max"), "generator": ("vi_identity_keep", "max"),
                        "virclass": ("synth_cfp_fp_acc", "max"), "virface": ("synth_cfp_fp_acc", "max"),
                        "baseline": ("synth_cfp_fp_acc", "max")}
    # A user's own pair sets: the hardest one given, whatever the order or the names.
    assert spaces["virclass"].resolve_metric(["lfw", "cfp_fp"]).metric_name == "cfp_fp_acc"
    assert spaces["virface"].resolve_metric(["lfw", "agedb_30", "cfp_ff"]).metric_name == "agedb_30_acc"
    assert spaces["pretrain"].resolve_metric(["my_holdout"]).metric_name == "my_holdout_acc"
    assert spaces["pretrain"].resolve_metric(["lfw", "my_holdout"]).metric_name == "my_holdout_acc"


def test_a_named_metric_the_data_cannot_produce_is_an_error_listing_the_ones_it_can(tmp_path):
    space = load(tmp_path, "# user's space\nmetric: {name: synth_cfp_fp_acc, mode: max}\n",
                 stage="virclass")
    with pytest.raises(ConfigError) as err:
        space.resolve_metric(["lfw", "cfp_fp"])
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'space.yaml'}:2: metric.name: 'synth_cfp_fp_acc'")
    assert "'cfp_fp_acc'" in message and "'lfw_acc'" in message and "loss_vc" in message
    # The same name is fine where the data has that pair set, and a loss needs no pair set.
    assert space.resolve_metric(["synth_cfp_fp"]).metric_name == "synth_cfp_fp_acc"
    loss = load(tmp_path, "metric: {name: loss_vc}\n", stage="virclass").resolve_metric([])
    assert (loss.metric_name, loss.metric_mode) == ("loss_vc", "min")


def test_an_accuracys_standard_error_is_a_metric_to_minimise_and_the_test_sets_stay_out(tmp_path):
    space = load(tmp_path, "metric: {name: lfw_acc_se}\n", stage="virclass").resolve_metric(["lfw"])
    assert (space.metric_name, space.metric_mode) == ("lfw_acc_se", "min")
    spread = load(tmp_path, "metric: {name: lfw_acc_std}\n", stage="virclass").resolve_metric(["lfw"])
    assert spread.metric_mode == "min"
    with pytest.raises(ConfigError, match="'test_lfw_acc_se' is a --test pair set's metric"):
        load(tmp_path, "metric: {name: test_lfw_acc_se}\n", stage="virclass").resolve_metric(["lfw"])


def test_only_pretrain_fixes_the_backbone():
    assert load_search_space(default_space_path("pretrain"), "pretrain").fixed["arch"] == \
        "mobilefacenet_s"


def test_shipped_virface_space_samples_g_lr_only_for_alternate():
    space = load_search_space(default_space_path("virface"), "virface")
    [g_lr] = [p for p in space.parameters if p.name == "g_lr"]
    assert g_lr.when == {"optim_mode": ("alternate",)}


# ---------------------------------------------------------------------------------------------
# Parsing


def test_parse_reads_every_section(tmp_path):
    space = load(tmp_path, """
        metric: {name: synth_cfp_fp_acc, mode: max}
        searcher: {type: tpe, seed: 7, n_startup_trials: 4}
        scheduler: {type: asha, grace_period: 2, reduction_factor: 3}
        budget: {num_samples: 6, time_budget_s: 600, max_concurrent_trials: 2}
        resources: {workers: 2, cpus_per_worker: 0.5, gpus_per_worker: 1}
        fixed: {max_epoch: 3}
        parameters:
          KL: {type: float, low: 0.1, high: 10.0, log: true, default: 2.0}
        """)
    assert (space.metric_name, space.metric_mode) == ("synth_cfp_fp_acc", "max")
    assert (space.searcher.type, space.searcher.arguments) == ("tpe", {"seed": 7, "n_startup_trials": 4})
    assert (space.scheduler.type, space.scheduler.arguments) == ("asha", {"grace_period": 2, "reduction_factor": 3})
    assert (space.budget.num_samples, space.budget.time_budget_s,
            space.budget.max_concurrent_trials) == (6, 600.0, 2)
    assert (space.resources.workers, space.resources.cpus_per_worker,
            space.resources.gpus_per_worker) == (2, 0.5, 1.0)
    assert space.fixed == {"max_epoch": 3}
    [kl] = space.parameters
    assert (kl.name, kl.type, kl.default) == ("KL", "float", 2.0)
    assert kl.distribution == optuna.distributions.FloatDistribution(0.1, 10.0, log=True)
    assert space.max_epochs == 3
    assert Path(space.path).is_absolute()


def test_exponent_without_a_dot_is_a_float(tmp_path):
    # Plain YAML 1.1 reads 1e-3 and 5e3 as strings.
    space = load(tmp_path, """
        metric: {name: acc, mode: max}
        fixed: {weight_decay: 5e-4}
        parameters:
          L2: {type: float, low: 5e2, high: 5E+4, log: true, default: 5e3}
        """)
    assert space.fixed["weight_decay"] == 5e-4
    [l2] = space.parameters
    assert (l2.distribution.low, l2.distribution.high, l2.default) == (500.0, 50000.0, 5000.0)


def test_optional_sections_take_documented_defaults(tmp_path):
    space = load(tmp_path, "metric: {name: acc, mode: min}\n")
    assert (space.searcher.type, space.searcher.arguments) == ("tpe", {"seed": 0})
    assert space.scheduler.type == "asha" and space.budget.num_samples == 10
    assert space.fixed == {} and space.parameters == [] and space.points_to_evaluate() == []


def test_parse_search_space_accepts_a_dict_and_names_where_it_came_from():
    mapping = {"metric": {"name": "acc", "mode": "max"},
               "parameters": {"m": {"type": "float", "low": 0.2, "high": 0.6, "default": 0.5}}}
    assert parse_search_space(mapping, "cli", "pretrain").parameters[0].name == "m"
    mapping["parameters"]["m"]["high"] = 0.1
    with pytest.raises(ConfigError, match=r"^cli: parameters\.m\.low: optuna.distributions.FloatDistribution: `low <= high`"):
        parse_search_space(mapping, "cli", "pretrain")


def test_inherited_fields_may_be_searched_in_pretrain(tmp_path):
    space = load(tmp_path, """
        metric: {name: acc, mode: max}
        fixed: {feat_len: 128}
        parameters:
          arch: {type: categorical, choices: [mobilefacenet_s, resnet18], default: mobilefacenet_s}
        """, stage="pretrain")
    assert space.fixed == {"feat_len": 128}


# ---------------------------------------------------------------------------------------------
# Validation: every error names the file, the line and the key path.

ERRORS = [
    # (id, yaml, stage, line, key path, fragment of the message)
    ("unknown top-level key", """
        metric: {name: acc, mode: max}
        searchr: {type: tpe}
        """, "virface", 2, "searchr", "unknown key (did you mean 'searcher'?); allowed keys: ['metric', "),
    ("unknown sub-key", """
        metric: {name: acc, mode: max}
        searcher:
          type: tpe
          sead: 1
        """, "virface", 4, "searcher.sead", "unknown key (did you mean 'seed'?); allowed keys: ['type', "),
    ("unknown searcher type", """
        metric: {name: acc, mode: max}
        searcher: {type: grid}
        """, "virface", 2, "searcher.type", "'grid' is not one of ['tpe', 'random', 'qmc', 'gp', 'nsga2']"),
    ("unknown scheduler type", """
        metric: {name: acc, mode: max}
        scheduler: {type: pbt}
        """, "virface", 2, "scheduler.type", "'pbt' is not one of ['asha', 'none']"),
    ("metric mode", """
        metric:
          name: acc
          mode: maximize
        """, "virface", 3, "metric.mode", "'maximize' is not one of ['max', 'min']"),
    ("empty metric name", """
        metric: {name: "", mode: max}
        """, "virface", 1, "metric.name", "must be a non-empty metric name, or leave it out"),
    ("num_samples < 1", """
        metric: {name: acc, mode: max}
        budget:
          num_samples: 0
        """, "virface", 3, "budget.num_samples", "0 must be an integer >= 1"),
    ("reduction_factor <= 1", """
        metric: {name: acc, mode: max}
        scheduler: {reduction_factor: 1}
        """, "virface", 2, "scheduler", "ASHAScheduler({'reduction_factor': 1}) fails: Reduction Factor not valid!"),
    ("grace period beyond max_epoch", """
        metric: {name: acc, mode: max}
        scheduler: {grace_period: 4}
        fixed: {max_epoch: 3}
        """, "virface", 2, "scheduler.grace_period", "it must be <= max_epoch"),
    ("parameter type", """
        metric: {name: acc, mode: max}
        parameters:
          KL: {type: uniform, low: 0.1, high: 1.0}
        """, "virface", 3, "parameters.KL.type",
     "'uniform' is not one of ['float', 'int', 'categorical']"),
    ("missing low", """
        metric: {name: acc, mode: max}
        parameters:
          KL: {type: float, high: 1.0}
        """, "virface", 3, "parameters.KL", "missing key 'low'"),
    ("missing choices", """
        metric: {name: acc, mode: max}
        parameters:
          optim_mode: {type: categorical, default: joint}
        """, "virface", 3, "parameters.optim_mode", "missing key 'choices'"),
    ("range key on a categorical", """
        metric: {name: acc, mode: max}
        parameters:
          optim_mode: {type: categorical, choices: [alternate, joint], log: true}
        """, "virface", 3, "parameters.optim_mode.log", "not allowed for a categorical"),
    ("low >= high", """
        metric: {name: acc, mode: max}
        parameters:
          KL:
            type: float
            low: 2.0
            high: 1.0
        """, "virface", 5, "parameters.KL.low", "FloatDistribution: `low <= high` must hold"),
    ("log with low <= 0", """
        metric: {name: acc, mode: max}
        parameters:
          KL:
            type: float
            low: 0.0
            high: 1.0
            log: true
        """, "virface", 5, "parameters.KL.low", "`low > 0` must hold for `log=True`"),
    ("step <= 0", """
        metric: {name: acc, mode: max}
        parameters:
          gen_num:
            type: int
            low: 1
            high: 9
            step: 0
        """, "virface", 7, "parameters.gen_num.step", "IntDistribution: `step > 0` must hold"),
    ("log with step", """
        metric: {name: acc, mode: max}
        parameters:
          KL:
            type: float
            low: 0.1
            high: 1.0
            log: true
            step: 0.1
        """, "virface", 8, "parameters.KL.step", "`step` is not supported when `log` is true"),
    ("int bounds", """
        metric: {name: acc, mode: max}
        parameters:
          gen_num: {type: int, low: 1, high: 9.5}
        """, "virface", 3, "parameters.gen_num.high", "9.5 must be an integer"),
    ("default outside the range", """
        metric: {name: acc, mode: max}
        parameters:
          KL:
            type: float
            low: 0.1
            high: 1.0
            default: 2.0
        """, "virface", 7, "parameters.KL.default", "2.0 is not a value of KL: float in [0.1, 1.0]"),
    ("default off the step grid", """
        metric: {name: acc, mode: max}
        parameters:
          gen_num: {type: int, low: 1, high: 9, step: 2, default: 4}
        """, "virface", 3, "parameters.gen_num.default", "4 is not a value of gen_num"),
    ("default not a choice", """
        metric: {name: acc, mode: max}
        parameters:
          optim_mode:
            type: categorical
            choices: [alternate, joint]
            default: both
        """, "virface", 6, "parameters.optim_mode.default",
     "'both' is not a value of optim_mode: one of ['alternate', 'joint']"),
    ("parameter that is not a TrainConfig field", """
        metric: {name: acc, mode: max}
        parameters:
          gen_nm: {type: int, low: 1, high: 10}
        """, "virface", 3, "parameters.gen_nm",
     "'gen_nm' is not a TrainConfig field; close matches: ['gen_num']"),
    ("fixed key that is not a TrainConfig field", """
        metric: {name: acc, mode: max}
        fixed:
          max_epochs: 3
        """, "virface", 3, "fixed.max_epochs", "close matches: ['max_epoch'"),
    ("both fixed and searched", """
        metric: {name: acc, mode: max}
        fixed: {KL: 2.0}
        parameters:
          KL: {type: float, low: 0.1, high: 10.0}
        """, "virface", 4, "parameters.KL", "both fixed and searched"),
    ("method is the stage's", """
        metric: {name: acc, mode: max}
        fixed: {method: pretrain}
        """, "virface", 2, "fixed.method", "set by the stage (virface)"),
    ("per-trial paths are the runner's", """
        metric: {name: acc, mode: max}
        fixed: {pretrained_file: /tmp/x.pt}
        """, "generator", 2, "fixed.pretrained_file", "set by the search runner"),
    ("searching an inherited field downstream", """
        metric: {name: acc, mode: max}
        parameters:
          arch: {type: categorical, choices: [resnet18, resnet50]}
        """, "virface", 3, "parameters.arch",
     "inherited from the upstream checkpoint; it cannot be searched in stage virface"),
    ("fixing an inherited field downstream", """
        metric: {name: acc, mode: max}
        fixed:
          max_epoch: 2
          feat_len: 128
        """, "generator", 4, "fixed.feat_len",
     "inherited from the upstream checkpoint; it cannot be fixed in stage generator"),
    ("when: unknown parameter", """
        metric: {name: acc, mode: max}
        parameters:
          g_lr: {type: float, low: 0.001, high: 0.3, when: {optim: alternate}}
        """, "virface", 3, "parameters.g_lr.when.optim", "it is not a searched parameter"),
    ("when: parameter defined later", """
        metric: {name: acc, mode: max}
        parameters:
          g_lr:
            type: float
            low: 0.001
            high: 0.3
            when: {optim_mode: alternate}
          optim_mode: {type: categorical, choices: [alternate, joint]}
        """, "virface", 7, "parameters.g_lr.when.optim_mode", "it is defined later"),
    ("when: cycle", """
        metric: {name: acc, mode: max}
        parameters:
          KL: {type: float, low: 0.1, high: 1.0, when: {L2: 5.0}}
          L2: {type: float, low: 1.0, high: 9.0, when: {KL: 0.5}}
        """, "virface", 3, "parameters.KL.when.L2", "so conditions cannot form cycles"),
    ("when: value the parameter never takes", """
        metric: {name: acc, mode: max}
        parameters:
          optim_mode: {type: categorical, choices: [alternate, joint]}
          g_lr: {type: float, low: 0.001, high: 0.3, when: {optim_mode: alternat}}
        """, "virface", 4, "parameters.g_lr.when.optim_mode",
     "'alternat' is not a value of optim_mode"),
    ("fixed value TrainConfig rejects", """
        metric: {name: acc, mode: max}
        fixed:
          max_epoch: 3
          m: 4.0
        """, "virface", 4, "fixed.m", "m: 4.0 is outside [0, pi)"),
    ("range end TrainConfig rejects", """
        metric: {name: acc, mode: max}
        parameters:
          dropout:
            type: float
            low: 0.0
            high: 1.0
            default: 0.5
        """, "virface", 6, "parameters.dropout.high", "dropout: 1.0 is outside [0, 1)"),
    ("choice TrainConfig rejects", """
        metric: {name: acc, mode: max}
        parameters:
          optim_mode:
            type: categorical
            choices:
              - alternate
              - sequential
        """, "virface", 7, "parameters.optim_mode.choices[1]", "'sequential' is not one of"),
    ("duplicate key", """
        metric: {name: acc, mode: max}
        parameters:
          KL: {type: float, low: 0.1, high: 1.0}
          KL: {type: float, low: 0.2, high: 1.0}
        """, "virface", 4, "parameters.KL", "duplicate key"),
    ("top level is a list", """
        - metric
        - parameters
        """, "virface", 1, "", "expected a mapping with keys ['metric',"),
]


@pytest.mark.parametrize("text, stage, line, key, fragment",
                         [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS])
def test_invalid_search_space_names_file_line_and_key(tmp_path, text, stage, line, key, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_search_space(path, stage)
    message = str(info.value)
    prefix = f"{path}:{line}: {key}: " if key else f"{path}:{line}: "
    assert message.startswith(prefix), message
    assert fragment in message, message


def test_empty_file_is_a_clear_error(tmp_path):
    path = write(tmp_path, "# nothing but a comment\n")
    with pytest.raises(ConfigError, match=r"space\.yaml: the search space is empty; expected a "
                                          r"mapping with keys \['metric'"):
        load_search_space(path, "virface")


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "metric: {name: acc, mode: max}\nparameters:\n  KL: {type: float\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: invalid YAML"):
        load_search_space(path, "virface")


def test_missing_file_and_unknown_stage(tmp_path):
    with pytest.raises(ConfigError, match="search space file not found"):
        load_search_space(tmp_path / "nope.yaml", "virface")
    path = write(tmp_path, "metric: {name: acc, mode: max}\n")
    with pytest.raises(ConfigError, match=r"stage 'virfac' is not one of \['pretrain'"):
        load_search_space(path, "virfac")


# ---------------------------------------------------------------------------------------------
# The Optuna search


def test_define_by_run_samples_within_ranges_and_returns_fixed(tmp_path):
    space = load(tmp_path, SMALL)
    study = optuna.create_study(direction="maximize", sampler=space.make_sampler())
    seen_modes = set()
    for _ in range(40):
        trial = study.ask()
        constants = space.define_by_run(trial)
        p = trial.params
        assert constants == {"max_epoch": 3, "steps_per_epoch": 5}
        assert isinstance(p["gen_num"], int) and 1 <= p["gen_num"] <= 10
        assert 0.1 <= p["KL"] <= 10.0
        assert round(p["m"], 9) in (0.2, 0.3, 0.4, 0.5, 0.6)
        assert isinstance(p["label_batch_size"], int) and 16 <= p["label_batch_size"] <= 256
        assert p["optim_mode"] in ("alternate", "joint")
        # The conditional parameter exists exactly when its condition holds.
        assert ("g_lr" in p) == (p["optim_mode"] == "alternate")
        if "g_lr" in p:
            assert 1e-3 <= p["g_lr"] <= 0.3
        seen_modes.add(p["optim_mode"])
        study.tell(trial, 0.0)
    assert seen_modes == {"alternate", "joint"}


def test_define_by_run_returns_a_copy_of_fixed(tmp_path):
    space = load(tmp_path, """
        metric: {name: acc, mode: max}
        fixed: {synthetic: {num_ids: 8}}
        parameters:
          m: {type: float, low: 0.2, high: 0.6, default: 0.5}
        """)
    constants = space.define_by_run(optuna.create_study().ask())
    constants["synthetic"]["num_ids"] = 99
    assert space.fixed == {"synthetic": {"num_ids": 8}}


def test_nested_condition_needs_its_parent_sampled(tmp_path):
    space = load(tmp_path, """
        metric: {name: acc, mode: max}
        parameters:
          optim_mode: {type: categorical, choices: [alternate, joint], default: joint}
          g_lr: {type: float, low: 0.001, high: 0.3, default: 0.1, when: {optim_mode: alternate}}
          KL: {type: float, low: 0.1, high: 1.0, default: 0.5, when: {g_lr: [0.1]}}
        """)
    g_lr, kl = space.parameters[1:]
    assert not kl.applies({"optim_mode": "joint"})
    assert kl.applies({"optim_mode": "alternate", "g_lr": 0.1})
    assert not kl.applies({"optim_mode": "alternate", "g_lr": 0.2})


def test_points_to_evaluate_are_the_defaults(tmp_path):
    space = load(tmp_path, SMALL)
    assert space.points_to_evaluate() == [{"gen_num": 5, "KL": 2.0, "m": 0.5,
                                           "label_batch_size": 128, "optim_mode": "alternate",
                                           "g_lr": 0.1}]


def test_points_to_evaluate_skip_a_parameter_whose_condition_fails(tmp_path):
    space = load(tmp_path, SMALL.replace("default: alternate", "default: joint"))
    [point] = space.points_to_evaluate()
    assert point["optim_mode"] == "joint" and "g_lr" not in point


def test_a_parameter_without_default_starts_from_the_train_config_default(tmp_path):
    space = load(tmp_path, SMALL.replace("low: 0.1, high: 10.0, log: true, default: 2.0",
                                         "low: 0.5, high: 10.0, log: true"))
    [point] = space.points_to_evaluate()
    assert point["KL"] == TrainConfig().KL == 2.0


def test_a_parameter_whose_train_config_default_is_outside_its_range_needs_a_default(tmp_path):
    with pytest.raises(ConfigError, match=r"space.yaml:\d+: parameters.KL: no default given, and "
                                          r"TrainConfig's default 2.0 is not a value of KL: float in "
                                          r"\[3.0, 10.0\], log scale; add default:"):
        load(tmp_path, SMALL.replace("low: 0.1, high: 10.0, log: true, default: 2.0",
                                     "low: 3.0, high: 10.0, log: true"))


def test_enqueued_defaults_are_what_the_first_trial_runs(tmp_path):
    space = load(tmp_path, SMALL)
    study = optuna.create_study(direction="maximize", sampler=space.make_sampler())
    for point in space.points_to_evaluate():
        study.enqueue_trial(point)
    trial = study.ask()
    space.define_by_run(trial)
    assert trial.params == space.points_to_evaluate()[0]


def test_ray_optuna_search_runs_defaults_first_then_samples(tmp_path):
    # Ray's searcher works without a cluster: no ray.init is needed to call suggest.
    from ray.tune.search.optuna import OptunaSearch

    space = load(tmp_path, SMALL)
    searcher = OptunaSearch(space=space.define_by_run, metric="acc", mode="max",
                            points_to_evaluate=space.points_to_evaluate(),
                            sampler=space.make_sampler())
    first = searcher.suggest("t0")
    assert first == {**space.points_to_evaluate()[0], "max_epoch": 3, "steps_per_epoch": 5}
    assert space.trial_config(first) == first
    searcher.on_trial_complete("t0", {"acc": 0.5})
    for i in range(1, 6):
        config = searcher.suggest(f"t{i}")
        assert config["max_epoch"] == 3 and 1 <= config["gen_num"] <= 10
        assert ("g_lr" in config) == (config["optim_mode"] == "alternate")
        searcher.on_trial_complete(f"t{i}", {"acc": 0.1 * i})


def test_ray_optuna_search_state_can_be_saved_and_restored(tmp_path):
    # Tune checkpoints the searcher by pickling it, define-by-run space included; a restored
    # search must keep sampling from the same space.
    from ray.tune.search.optuna import OptunaSearch

    space = load(tmp_path, SMALL)
    searcher = OptunaSearch(space=space.define_by_run, metric="acc", mode="max",
                            points_to_evaluate=space.points_to_evaluate(),
                            sampler=space.make_sampler())
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"acc": 0.5})
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = OptunaSearch(metric="acc", mode="max")
    restored.restore(str(tmp_path / "searcher.pkl"))
    config = restored.suggest("t1")
    assert config["max_epoch"] == 3 and ("g_lr" in config) == (config["optim_mode"] == "alternate")


def test_sampler_follows_the_searcher_type(tmp_path):
    random_space = load(tmp_path, SMALL)
    tpe_space = load(tmp_path, SMALL.replace("{type: random, seed: 3}",
                                             "{type: tpe, seed: 3, n_startup_trials: 4}"))
    assert isinstance(random_space.make_sampler(), optuna.samplers.RandomSampler)
    tpe = tpe_space.make_sampler()
    assert isinstance(tpe, optuna.samplers.TPESampler) and tpe._n_startup_trials == 4


def test_same_seed_samples_the_same_values(tmp_path):
    space = load(tmp_path, SMALL)

    def first_params():
        trial = optuna.create_study(sampler=space.make_sampler()).ask()
        space.define_by_run(trial)
        return trial.params

    assert first_params() == first_params()


def test_trial_config_overlays_sampled_values_on_fixed(tmp_path):
    space = load(tmp_path, SMALL)
    assert space.trial_config({"KL": 1.5}) == {"max_epoch": 3, "steps_per_epoch": 5, "KL": 1.5}


def test_max_epochs_is_the_largest_a_searched_max_epoch_can_take(tmp_path):
    space = load(tmp_path, """
        metric: {name: acc, mode: max}
        parameters:
          max_epoch: {type: int, low: 2, high: 6, default: 4}
        """)
    assert space.max_epochs == 6


def test_the_selection_rule_is_a_key_of_the_space_fixed_in_every_shipped_one(tmp_path):
    for stage in METHODS:
        assert load_search_space(default_space_path(stage), stage).selection == "mean_last:3"
    space = load(tmp_path, "selection: last\nmetric: {name: acc, mode: max}\n")
    assert space.selection == "last" and space.describe()["selection"] == "last"
    # Absent: the best epoch, as virface-train; describe() then matches records made before the key.
    space = load(tmp_path, "metric: {name: acc, mode: max}\n")
    assert space.selection == "best" and "selection" not in space.describe()


@pytest.mark.parametrize("text, line, key, fragment", [
    ("metric: {name: acc, mode: max}\nselection: mean_last:0\n", 2, "selection",
     "'mean_last:0' is not best, last or mean_last:K"),
    ("metric: {name: acc, mode: max}\nfixed: {selection: last}\n", 2, "fixed.selection",
     "set by the top-level 'selection' key"),
])
def test_a_bad_selection_rule_names_file_line_and_key(tmp_path, text, line, key, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_search_space(path, "virface")
    assert str(info.value).startswith(f"{path}:{line}: {key}: ") and fragment in str(info.value)
