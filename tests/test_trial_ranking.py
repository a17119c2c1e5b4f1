"""Which trial a stage chooses and which it carries on: the stage's ranking of its trials at their
best validation epochs, by the selection metric's mode. No Ray: the runner calls these on the
points Tune returned."""
from virface.search.pareto import SelectRule, TrialPoint, carried_trials, rank_by_rule, rank_trials


def points(**values):
    """Trials in the order they finished: trial id -> (acc, loss)."""
    return [TrialPoint(name, {"acc": acc, "loss": loss}, f"/runs/{name}/best.pt")
            for name, (acc, loss) in values.items()]


# Finished in the order a, b, c, d. By accuracy (higher is better): b 0.91 > d 0.85 > a 0.70 >
# c 0.40. By loss (lower is better): c 0.12 < a 0.25 < d 0.30 < b 0.55. Neither order is the
# finishing order nor its reverse.
TRIALS = dict(a=(0.70, 0.25), b=(0.91, 0.55), c=(0.40, 0.12), d=(0.85, 0.30))


def ids(ranked):
    return [p.trial_id for p in ranked]


def test_mode_max_chooses_the_highest_value_first():
    assert ids(rank_trials(points(**TRIALS), "acc", "max")) == ["b", "d", "a", "c"]


def test_mode_min_chooses_the_lowest_value_first():
    assert ids(rank_trials(points(**TRIALS), "loss", "min")) == ["c", "a", "d", "b"]


def test_trials_that_trained_every_epoch_rank_before_those_stopped_early_in_either_mode():
    # b and c were stopped early: each comes after a and d, still best first among themselves.
    assert ids(rank_trials(points(**TRIALS), "acc", "max", completed={"a", "d"})) == ["d", "a", "b", "c"]
    assert ids(rank_trials(points(**TRIALS), "loss", "min", completed={"a", "d"})) == ["a", "d", "c", "b"]
    assert ids(rank_trials(points(**TRIALS), "acc", "max", completed=set())) == ["b", "d", "a", "c"]


def test_negative_values_rank_by_value_not_by_magnitude():
    trials = [TrialPoint("near", {"m": -0.1}), TrialPoint("far", {"m": -2.0}), TrialPoint("up", {"m": 0.5})]
    assert ids(rank_trials(trials, "m", "max")) == ["up", "near", "far"]
    assert ids(rank_trials(trials, "m", "min")) == ["far", "near", "up"]


def test_equal_values_keep_the_order_the_trials_finished_in():
    trials = points(first=(0.8, 0.2), second=(0.9, 0.2), third=(0.8, 0.2))
    assert ids(rank_trials(trials, "acc", "max")) == ["second", "first", "third"]
    assert ids(rank_trials(trials, "loss", "min")) == ["first", "second", "third"]


def test_carry_top_passes_the_k_best_on_best_first():
    ranked = rank_trials(points(**TRIALS), "acc", "max")
    assert ids(carried_trials(ranked, 2)) == ["b", "d"]
    assert ids(carried_trials(ranked, 3)) == ["b", "d", "a"]
    ranked = rank_trials(points(**TRIALS), "loss", "min")
    assert ids(carried_trials(ranked, 2)) == ["c", "a"]


def test_carry_top_beyond_the_trials_carries_every_trial_and_one_carries_none():
    ranked = rank_trials(points(**TRIALS), "acc", "max")
    assert ids(carried_trials(ranked, 7)) == ["b", "d", "a", "c"]
    assert carried_trials(ranked, 1) == []                  # the plain chain: ranked[0] alone


def test_a_select_rule_ranks_inside_its_bounds_in_its_own_mode():
    # Lowest loss among the trials with acc >= 0.6: a (0.25), d (0.30), b (0.55); c is out.
    rule = SelectRule("loss", "min", {"acc": (0.6, None)})
    assert ids(rank_by_rule(points(**TRIALS), rule)) == ["a", "d", "b"]
    rule = SelectRule("acc", "max", {"loss": (None, 0.3)})
    assert ids(rank_by_rule(points(**TRIALS), rule)) == ["d", "a", "c"]
