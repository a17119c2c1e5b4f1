"""Accuracy against cost: the Pareto front, the select rule, the cost metrics and the search
spaces that ask for them (no Ray here; tests/test_search_ray.py runs a search)."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch
from torch import nn

from virface.cost import count_macs, model_cost
from virface.errors import ConfigError
from virface.search.pareto import (NoTrialSelected, Objective, SelectRule, TrialPoint, dominates, format_front,
                                   pareto_front, plot_front, rank_by_rule, select_point)
from virface.search.space import CHECKOUT_SPACES, load_search_space

ACC, LAT = Objective("acc", "max"), Objective("latency_ms", "min")
SYNTHETIC = ["synth_lfw", "synth_cfp_ff", "synth_cfp_fp"]


def point(trial_id, acc, latency, **params):
    return TrialPoint(trial_id, {"acc": acc, "latency_ms": latency}, f"/{trial_id}.pt", params)


# A: most accurate; B and D tie (both stay); C is worse than A on both; E is the fastest;
# F has no accuracy (a NaN) and is on no front.
POINTS = [point("A", 0.90, 10.0), point("B", 0.80, 5.0), point("C", 0.85, 12.0),
          point("D", 0.80, 5.0), point("E", 0.70, 2.0), point("F", math.nan, 1.0)]


def test_the_front_keeps_exactly_the_trials_no_other_beats_on_both_objectives():
    front = pareto_front(POINTS, [ACC, LAT])
    assert [p.trial_id for p in front] == ["A", "B", "D", "E"]
    for p in front:                                  # non-dominated, checked pairwise
        assert not any(dominates(q.values, p.values, [ACC, LAT]) for q in front)
    assert dominates(POINTS[0].values, POINTS[2].values, [ACC, LAT])      # A over C


def test_a_tie_on_one_objective_and_a_loss_on_the_other_is_dominated():
    same_acc = [point("fast", 0.9, 5.0), point("slow", 0.9, 10.0)]        # tie on the max objective
    assert [p.trial_id for p in pareto_front(same_acc, [ACC, LAT])] == ["fast"]
    same_latency = [point("worse", 0.8, 5.0), point("better", 0.9, 5.0)]  # tie on the min objective
    assert [p.trial_id for p in pareto_front(same_latency, [ACC, LAT])] == ["better"]


def test_a_third_objective_can_put_a_dominated_pair_back_on_the_front():
    params = Objective("params", "min")
    points = [TrialPoint("A", {"acc": 0.9, "latency_ms": 10.0, "params": 5e6}),
              TrialPoint("C", {"acc": 0.85, "latency_ms": 12.0, "params": 1e6})]
    assert [p.trial_id for p in pareto_front(points, [ACC, LAT])] == ["A"]
    assert [p.trial_id for p in pareto_front(points, [ACC, LAT, params])] == ["A", "C"]


def test_the_select_rule_picks_the_most_accurate_trial_under_the_latency_bound():
    front = pareto_front(POINTS, [ACC, LAT])
    assert select_point(front, SelectRule("acc", "max", {"latency_ms": (None, 6.0)})).trial_id == "B"
    assert select_point(front, SelectRule("acc", "max")).trial_id == "A"
    assert select_point(front, SelectRule("latency_ms", "min", {"acc": (0.8, None)})).trial_id == "B"
    assert [p.trial_id for p in rank_by_rule(front, SelectRule("acc", "max", {"latency_ms": (None, 6.0)}))] \
        == ["B", "D", "E"]
    with pytest.raises(NoTrialSelected, match=r"latency_ms <= 1.*loosen the bounds"):
        select_point(front, SelectRule("acc", "max", {"latency_ms": (None, 1.0)}))


def test_a_select_rule_describes_itself_as_it_selects():
    assert SelectRule("acc", "max").describe() == "maximize acc"
    assert SelectRule("latency_ms", "min", {"acc": (0.8, 0.95), "params": (None, 2e6)}).describe() \
        == "minimize latency_ms where acc >= 0.8 and acc <= 0.95 and params <= 2e+06"


def test_no_trial_under_the_bounds_names_the_rule_and_every_front_trial():
    front = pareto_front(POINTS, [ACC, LAT])
    with pytest.raises(NoTrialSelected) as caught:
        select_point(front, SelectRule("acc", "max", {"latency_ms": (None, 1.0)}))
    assert str(caught.value).endswith(
        "'maximize acc where latency_ms <= 1' (front: A: acc=0.9, latency_ms=10; B: acc=0.8, "
        "latency_ms=5; D: acc=0.8, latency_ms=5; E: acc=0.7, latency_ms=2); loosen the bounds")
    with pytest.raises(NoTrialSelected, match=r"\(front: empty\); loosen the bounds$"):
        select_point([], SelectRule("acc", "max"))


def test_the_front_table_lists_best_first_marks_the_chosen_and_names_the_rule():
    front = pareto_front(POINTS, [ACC, LAT])
    front[0].params = {"arch": "resnet18", "lr": 0.0324}
    front[1].params = {"arch": "mobilefacenet", "macs": 2.5e8}
    table = format_front([ACC, LAT], front, "B", SelectRule("acc", "max", {"latency_ms": (None, 6.0)}))
    assert table.splitlines() == [
        "Pareto front on acc (max), latency_ms (min): 4 trial(s); select: maximize acc where latency_ms <= 6",
        f"  {'trial':<16}{'acc':>19}{'latency_ms':>19}  params",
        f"  {'A':<16}{'0.9000':>19}{'10.0000':>19}  arch=resnet18, lr=0.0324",
        f"* {'B':<16}{'0.8000':>19}{'5.0000':>19}  arch=mobilefacenet, macs=2.5e+08",
        f"  {'D':<16}{'0.8000':>19}{'5.0000':>19}  ",
        f"  {'E':<16}{'0.7000':>19}{'2.0000':>19}  "]
    # With a min objective first, the fastest trial leads; no rule, no "select".
    assert format_front([LAT, ACC], front, None, None).splitlines()[2].startswith("  E ")
    assert format_front([LAT, ACC], front, None, None).splitlines()[0] == \
        "Pareto front on latency_ms (min), acc (max): 4 trial(s)"


def test_the_front_and_rule_are_recorded_as_plain_json():
    assert SelectRule("acc", "max", {"latency_ms": (None, 6.0)}).to_dict() == {
        "metric": "acc", "mode": "max", "where": {"latency_ms": {"min": None, "max": 6.0}}}
    p = point("A", 0.9, 10.0, arch="resnet18")
    assert p.to_dict() == {"trial_id": "A", "values": {"acc": 0.9, "latency_ms": 10.0},
                           "checkpoint": "/A.pt", "params": {"arch": "resnet18"}}
    assert p.to_dict()["values"] is not p.values            # a copy, not the live dict


def test_the_front_plot_is_written(tmp_path):
    front = pareto_front(POINTS, [ACC, LAT])
    path = plot_front([ACC, LAT], POINTS, front, "A", str(tmp_path / "front.png"))
    assert (tmp_path / "front.png").stat().st_size > 1000 and path.endswith("front.png")


def test_cost_counts_parameters_and_multiply_accumulates_of_a_known_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(),
                          nn.Linear(4 * 16 * 16, 8, bias=False))
    # conv: 16*16 outputs x 4 channels x (3 x 3 x 3) MACs each; linear: 1024 x 8
    assert count_macs(model, torch.zeros(1, 3, 16, 16)) == 16 * 16 * 4 * 27 + 1024 * 8
    model.train()
    cost = model_cost(model, 16)
    assert cost["params"] == 4 * 27 + 1024 * 8 and cost["macs"] == 35840
    assert cost["latency_ms"] > 0 and model.training          # the mode is put back


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_a_list_of_objectives_resolves_the_unnamed_one_and_turns_asha_off(tmp_path):
    space = load_search_space(write(tmp_path, """
        metric:
          - {mode: max}
          - {name: latency_ms}
        select: {maximize: synth_cfp_fp_acc, where: {latency_ms: {max: 5}}}
        """), "pretrain").resolve_metric(SYNTHETIC)
    assert [(o.name, o.mode) for o in space.objectives] == [("synth_cfp_fp_acc", "max"), ("latency_ms", "min")]
    assert space.metric_name == "synth_cfp_fp_acc" and space.scheduler.type == "none"
    assert space.cost_metrics == ["latency_ms"] and space.multi_objective
    assert space.select_rule() == SelectRule("synth_cfp_fp_acc", "max", {"latency_ms": (None, 5.0)})


@pytest.mark.parametrize("text, line, fragment", [
    ("metric: [{mode: max}, {name: latency_ms}]\nscheduler: {type: asha}\n", 2,
     "scheduler.type: ASHA stops trials by one metric"),
    ("metric: {name: synth_lfw_acc}\nselect: {maximize: synth_lfw_acc}\n", 2,
     "select: select picks a trial from a Pareto front"),
    ("metric:\n  - {mode: max}\n  - {name: latency_ms, mode: max}\n", 3,
     "metric[1].mode: latency_ms is a cost; it can only be minimised"),
    ("metric: [{name: params}, {name: macs}]\n", 1, "metric: every objective is a cost"),
    ("metric: [{mode: max}]\n", 1, "metric: a list names several objectives"),
    ("metric: [{mode: max}, {name: latency_ms}]\nselect:\n  where: {latency_ms: {min: 5, max: 2}}\n", 3,
     "select.where.latency_ms.min: 5 is more than max 2"),
    ("metric: [{mode: max}, {name: latency_ms}]\nselect: {maximize: a, minimize: b}\n", 2,
     "select.minimize: give one of maximize or minimize"),
])
def test_invalid_objectives_and_select_rules_name_file_line_and_key(tmp_path, text, line, fragment):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_search_space(path, "pretrain")
    assert str(err.value).startswith(f"{path}:{line}: ") and fragment in str(err.value)


def test_a_select_rule_on_something_that_is_no_objective_fails_once_the_data_is_known(tmp_path):
    path = write(tmp_path, """
        metric: [{mode: max}, {name: latency_ms}]
        select: {where: {macs: {max: 1e6}}}
        """)
    with pytest.raises(ConfigError, match=rf"^{path}:2: select.where.macs: 'macs' is not an objective"):
        load_search_space(path, "pretrain").resolve_metric(SYNTHETIC)


def test_the_shipped_pareto_space_searches_three_backbones_against_latency():
    space = load_search_space(CHECKOUT_SPACES / "pretrain_pareto.yaml", "pretrain").resolve_metric(SYNTHETIC)
    [arch] = [p for p in space.parameters if p.name == "arch"]
    assert len(arch.distribution.choices) >= 3 and space.scheduler.type == "none"
    assert [o.name for o in space.objectives] == ["synth_cfp_fp_acc", "latency_ms"]
    assert space.select_rule().bounds == {"latency_ms": (None, 10.0)}


def test_front_numbers_show_four_decimals_below_a_thousand_and_four_significant_digits_from_there():
    from virface.search.pareto import _number

    assert [_number(v) for v in (0.91234, 999.5, 1000.0, 1234.5, 2.5e8)] == \
        ["0.9123", "999.5000", "1000", "1234", "2.5e+08"]
    assert _number("resnet18") == "resnet18"
