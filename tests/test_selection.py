"""The selection rule (virface.selection): how a run's value and its best.pt are taken from its
epochs, worked out by hand on fixed metric histories; its one spelling, validated with errors that
name the key; and the same rule in a stage's best_<metric>, best.pt and checkpoints."""
import math

import pytest

from virface.config import TrainConfig
from virface.errors import ConfigError
from virface.selection import RuleTracker, SelectionRule, parse_rule

# Validation accuracy per epoch (epochs 1..6): the best epoch is 4 (0.80); the last is 0.74.
HISTORY = [0.60, 0.70, 0.72, 0.80, 0.75, 0.74]
# A loss per epoch, lower is better: the best epoch is 3 (0.9).
LOSSES = [2.0, 1.1, 0.9, 1.3, 1.0]


@pytest.mark.parametrize("text, value, epoch", [
    ("best", 0.80, 4),
    ("last", 0.74, 6),
    ("mean_last:3", (0.80 + 0.75 + 0.74) / 3, 6),
    ("mean_last:1", 0.74, 6),
    ("mean_last:10", sum(HISTORY) / 6, 6),          # fewer epochs than K: all of them
])
def test_each_rule_takes_the_value_and_epoch_worked_out_by_hand(text, value, epoch):
    rule = parse_rule(text)
    assert rule.value_and_epoch(HISTORY, "max") == (pytest.approx(value), epoch)


@pytest.mark.parametrize("text, value, epoch", [
    ("best", 0.9, 3), ("last", 1.0, 5), ("mean_last:2", 1.15, 5)])
def test_for_a_loss_best_is_the_lowest_and_the_means_are_the_same(text, value, epoch):
    assert parse_rule(text).value_and_epoch(LOSSES, "min") == (pytest.approx(value), epoch)


def test_best_takes_the_earliest_of_equal_epochs_and_never_a_nan():
    assert parse_rule("best").value_and_epoch([0.5, 0.7, 0.7], "max") == (0.7, 2)
    assert parse_rule("best").value_and_epoch([math.nan, 0.6, 0.55], "max") == (0.6, 2)


@pytest.mark.parametrize("text", ["mean_last:0", "mean_last", "mean_last:x", "mean-last:3", "Best",
                                  "last:2", "", 3, None])
def test_a_misspelt_rule_is_an_error_naming_the_key_and_the_spellings(text):
    with pytest.raises(ConfigError, match=r"selection: .*best, last or mean_last:K"):
        SelectionRule.parse(text)


def test_the_rule_is_a_train_config_field_defaulting_to_best_and_validated():
    assert TrainConfig().selection == "best"
    assert TrainConfig(selection=" mean_last:3").selection == "mean_last:3"    # one spelling
    with pytest.raises(ConfigError, match="selection: 'mean:3'"):
        TrainConfig(selection="mean:3")


def test_the_tracker_reports_the_rule_so_far_and_points_best_pt_at_the_rule_epoch():
    # Per epoch: (is best.pt now, best_<metric>), from the history above.
    best = RuleTracker(parse_rule("best"), "acc", "max")
    assert [best.update(v, e) for e, v in enumerate(HISTORY, 1)] == [
        (True, 0.60), (True, 0.70), (True, 0.72), (True, 0.80), (False, 0.80), (False, 0.80)]
    mean3 = RuleTracker(parse_rule("mean_last:3"), "acc", "max")
    steps = [mean3.update(v, e) for e, v in enumerate(HISTORY, 1)]
    assert all(is_best for is_best, _ in steps)
    assert [v for _, v in steps] == pytest.approx([0.60, 0.65, 0.6733333, 0.74, 0.7566667, 0.7633333])
    assert mean3.best["epoch"] == 6


def test_a_resumed_tracker_continues_the_window_and_may_not_change_the_rule():
    first = RuleTracker(parse_rule("mean_last:3"), "acc", "max")
    for e, v in enumerate(HISTORY[:4], 1):
        first.update(v, e)
    resumed = RuleTracker.from_state(parse_rule("mean_last:3"), "acc", "max", first.state())
    values = [resumed.update(v, e)[1] for e, v in enumerate(HISTORY[4:], 5)]
    assert values == pytest.approx([(0.72 + 0.80 + 0.75) / 3, (0.80 + 0.75 + 0.74) / 3])
    with pytest.raises(ConfigError, match="selection: the resumed run used 'mean_last:3', not 'best'"):
        RuleTracker.from_state(parse_rule("best"), "acc", "max", first.state())
    # A checkpoint from before the rule existed was selected by the best epoch.
    old = {"metric": "acc", "mode": "max", "value": 0.8, "epoch": 4}
    assert RuleTracker.from_state(parse_rule("best"), "acc", "max", old).best["value"] == 0.8
    with pytest.raises(ConfigError, match="may not change the selection rule"):
        RuleTracker.from_state(parse_rule("last"), "acc", "max", old)


# Three trials' per-epoch metric. As accuracies (max): best A 0.90 > C 0.80 > B 0.76; last B 0.76 >
# C 0.70 > A 0.64; mean of the last 3: C 0.767 > B 0.74 > A 0.72. As losses (min): best C 0.50 <
# A 0.60 < B 0.70; last A 0.64 < C 0.70 < B 0.76; mean of the last 3: A 0.72 < B 0.74 < C 0.767.
TRIALS = {"A": [0.60, 0.90, 0.62, 0.64], "B": [0.70, 0.72, 0.74, 0.76], "C": [0.50, 0.80, 0.80, 0.70]}


@pytest.mark.parametrize("rule, mode, order", [
    ("best", "max", "ACB"), ("last", "max", "BCA"), ("mean_last:3", "max", "CBA"),
    ("best", "min", "CAB"), ("last", "min", "ACB"), ("mean_last:3", "min", "ABC")])
def test_a_search_ranks_trials_by_the_value_their_rule_reported(tmp_path, rule, mode, order):
    from types import SimpleNamespace

    from virface.search.pareto import SelectRule, TrialPoint, rank_by_rule
    from virface.search.runner import best_epoch_of

    points = []
    for trial_id, history in TRIALS.items():
        tracker = RuleTracker(parse_rule(rule), "m", mode)
        reported = [tracker.update(v, e)[1] for e, v in enumerate(history, 1)]   # best_m per epoch
        result = SimpleNamespace(metrics={"m": history[-1], "best_m": reported[-1]},
                                 checkpoint=SimpleNamespace(path=str(tmp_path)))
        path, values = best_epoch_of(result, "m")
        points.append(TrialPoint(trial_id, {"m": values["m"]}, path))
    assert "".join(p.trial_id for p in rank_by_rule(points, SelectRule("m", mode))) == order
