"""How a finished stage search concludes (virface.search.runner.conclude_stage), without Ray: which
trial it chooses (best value at each trial's best validation epoch, max or min), which epoch's
checkpoint goes on, what is carried on with --carry_top and in which order, what each trial
started from, and that failed trials never win."""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import write_space
from virface.checkpoint import FORMAT
from virface.ray_train import BEST_FILE, CHECKPOINT_FILE
from virface.search.manifest import manifest_path, read_manifest
from virface.search.runner import SearchOptions, conclude_stage, prepare_space, with_upstream_parameter

METRIC = "synth_cfp_fp_acc"


def trial_result(root, trial_id, best, last=None, *, best_epoch_earlier=True, error=None, params=None,
                 metric=METRIC, extra_metrics=None, epochs=2):
    """A finished trial as Tune returns it: its last report (``best_<metric>`` the best epoch's
    value, ``metric`` the last epoch's) and its latest checkpoint folder, holding best.pt when the
    best epoch was an earlier one. Each checkpoint file records which trial and epoch wrote it."""
    folder = root / f"trial_{trial_id}" / "checkpoint_000002"
    folder.mkdir(parents=True)
    chosen_metrics = {metric: best, f"{metric}_se": 0.01, "test_synth_cfp_fp_acc": 0.5 + best / 10,
                      "loss": 3.0, **(extra_metrics or {})}
    state = {"format": FORMAT, "config": {"trial": trial_id, "epoch": 1 if best_epoch_earlier else 2},
             "metrics": chosen_metrics}
    torch.save(state, folder / (BEST_FILE if best_epoch_earlier else CHECKPOINT_FILE))
    if best_epoch_earlier:
        torch.save({**state, "config": {"trial": trial_id, "epoch": 2}}, folder / CHECKPOINT_FILE)
    metrics = {"trial_id": trial_id, "epoch": epochs, metric: best if last is None else last,
               f"best_{metric}": best}
    return SimpleNamespace(error=error, metrics=None if error else metrics, config=dict(params or {}),
                           path=str(root / f"trial_{trial_id}"), checkpoint=SimpleNamespace(path=str(folder)))


class RecordingMirror:
    """What the stage sends to remote storage, in order (a local search sends nothing)."""

    def __init__(self):
        self.calls = []

    def sync(self, skip=()):
        self.calls.append(("sync", list(skip)))

    def push(self, path):
        self.calls.append(("push", path))


def conclude(tmp_path, results, *, stage="pretrain", space=None, carry_top=1, upstream=None, parent=None,
             choices=None, said=None, mirror=None, **option_changes):
    options = SearchOptions(stage=stage, storage=str(tmp_path / "exp"), budget="smoke", quiet=True,
                            carry_top=carry_top, **option_changes)
    space = space or prepare_space(options, stage)
    return conclude_stage(options, stage, space, results, upstream=upstream, parent=parent,
                          choices=choices or {}, mirror=mirror or options.mirror(),
                          say=(said.append if said is not None else lambda text: None))


def test_the_trial_with_the_highest_best_epoch_value_is_chosen_not_the_highest_last_epoch(tmp_path):
    results = [trial_result(tmp_path, "a", 0.70, last=0.90), trial_result(tmp_path, "b", 0.80, last=0.60,
                                                                       extra_metrics={"vi_identity_keep": -0.05}),
               trial_result(tmp_path, "c", 0.75, last=0.75)]
    mirror = RecordingMirror()
    outcome = conclude(tmp_path, results, mirror=mirror, num_samples=3)
    path = manifest_path(tmp_path / "exp", "default", "pretrain")
    assert (outcome.stage, outcome.manifest_path, outcome.metric, outcome.error) == ("pretrain", str(path), METRIC, None)
    assert [r.trial_id for r in outcome.rows] == ["a", "b", "c"]
    # The manifest is what makes the stage finished: sent after everything it refers to.
    assert mirror.calls == [("sync", []), ("sync", ["pretrain/best.json"]), ("push", "pretrain/best.json")]
    m = outcome.manifest
    assert m.instance_metrics == {"vi_identity_keep": -0.05} and m.overrides == {"num_samples": 3}
    assert m.pareto is None and m.trial_upstreams == {}
    assert (m.trial_id, m.metric_value, m.metric_mode) == ("b", 0.80, "max")
    # The chosen trial's best epoch (an earlier one: best.pt), not its last.
    assert m.checkpoint.endswith(f"trial_b/checkpoint_000002/{BEST_FILE}")
    assert m.config == {"trial": "b", "epoch": 1}
    assert m.metric_se == 0.01
    assert m.test_metrics == {"test_synth_cfp_fp_acc": pytest.approx(0.58)}
    assert read_manifest(manifest_path(tmp_path / "exp", "default", "pretrain")).trial_id == "b"
    assert m.lineage == ["pretrain:b"] and m.upstream is None and m.carried == []


def test_a_min_metric_chooses_the_lowest(tmp_path):
    space_file = write_space(tmp_path, "pretrain", metric={"name": "loss", "mode": "min"})
    options = SearchOptions(stage="pretrain", storage=str(tmp_path / "exp"), budget="smoke", space=space_file)
    space = prepare_space(options, "pretrain")
    results = [trial_result(tmp_path, t, v, metric="loss", best_epoch_earlier=False)
               for t, v in (("a", 2.5), ("b", 1.5), ("c", 3.5))]
    m = conclude(tmp_path, results, space=space).manifest
    assert (m.trial_id, m.metric_value, m.metric_mode) == ("b", 1.5, "min")
    assert m.checkpoint.endswith(f"trial_b/checkpoint_000002/{CHECKPOINT_FILE}")


def test_a_failed_trial_never_wins_and_a_stage_whose_every_trial_failed_writes_no_manifest(tmp_path):
    results = [trial_result(tmp_path, "a", 0.70), trial_result(tmp_path, "bad", 0.99, error="boom\nValueError: x")]
    outcome = conclude(tmp_path, results)
    assert outcome.manifest.trial_id == "a"
    assert [r.outcome for r in outcome.rows] == ["completed", "failed"]

    long_error = "RuntimeError: " + "x" * 300
    failed = conclude(tmp_path / "other", [trial_result(tmp_path / "other", t, 0.9, error=e) for t, e in
                                           (("bad", "Traceback\n  line\nValueError: x"), ("worse", "OSError: y"))])
    assert [(r.epochs, r.error) for r in failed.rows] == [(0, "ValueError: x"), (0, "OSError: y")]
    cut = conclude(tmp_path / "cut", [trial_result(tmp_path / "cut", "long", 0.9, error=long_error)])
    assert cut.rows[0].error == long_error[:200]
    assert failed.manifest is None
    assert (failed.stage, failed.metric, [r.trial_id for r in failed.rows]) == ("pretrain", METRIC, ["trial_bad", "trial_worse"])
    assert failed.error == "every trial of stage pretrain failed: OSError: y; ValueError: x"
    assert not manifest_path(tmp_path / "other" / "exp", "default", "pretrain").exists()


def test_a_trial_without_a_finite_best_value_is_not_chosen(tmp_path):
    results = [trial_result(tmp_path, "nan", float("nan")), trial_result(tmp_path, "a", 0.6)]
    assert conclude(tmp_path, results).manifest.trial_id == "a"


def test_carry_top_passes_the_k_best_on_best_first_with_what_each_started_from(tmp_path):
    results = [trial_result(tmp_path, t, v) for t, v in (("a", 0.70), ("b", 0.90), ("c", 0.80), ("d", 0.60))]
    parent = SimpleNamespace(stage="pretrain", trial_id="p0", lineage=["pretrain:p0"], carried=[])
    m = conclude(tmp_path, results, stage="baseline", carry_top=3, upstream="/up/p0.pt", parent=parent).manifest
    assert [c["trial_id"] for c in m.carried] == ["b", "c", "a"]
    assert [c["metric_value"] for c in m.carried] == [0.90, 0.80, 0.70]
    assert all(c["upstream"] == "p0" and c["upstream_checkpoint"] == "/up/p0.pt" for c in m.carried)
    assert m.carried[1]["lineage"] == ["pretrain:p0", "baseline:c"]
    assert m.carried[1]["checkpoint"].endswith(f"trial_c/checkpoint_000002/{BEST_FILE}")
    assert (m.trial_id, m.upstream, m.lineage) == ("b", "/up/p0.pt", ["pretrain:p0", "baseline:b"])


def test_carry_top_with_fewer_qualifying_trials_says_so_and_carries_those(tmp_path):
    said = []
    results = [trial_result(tmp_path, "a", 0.7), trial_result(tmp_path, "b", 0.8),
               trial_result(tmp_path, "x", 0.9, error="boom")]
    m = conclude(tmp_path, results, carry_top=3, said=said).manifest
    assert [c["trial_id"] for c in m.carried] == ["b", "a"]
    assert any("--carry_top 3: only 2 trial(s) qualify" in line for line in said)


def two_upstream_choices(tmp_path):
    """A baseline stage choosing between two carried pretrain trials: its space (with the
    ``upstream`` parameter), the choices, and a trial started from each (b, from p2, is better)."""
    choices = {"p1": {"checkpoint": "/up/p1.pt", "lineage": ["pretrain:p1"]},
               "p2": {"checkpoint": "/up/p2.pt", "lineage": ["pretrain:p2"]}}
    options = SearchOptions(stage="baseline", storage=str(tmp_path / "exp"), budget="smoke")
    space = with_upstream_parameter(prepare_space(options, "baseline"), list(choices))
    results = [trial_result(tmp_path, "a", 0.70, params={"upstream": "p1"}),
               trial_result(tmp_path, "b", 0.85, params={"upstream": "p2"})]
    return space, choices, results


def test_a_stage_choosing_among_carried_upstream_trials_records_which_each_trial_started_from(tmp_path):
    space, choices, results = two_upstream_choices(tmp_path)
    m = conclude(tmp_path, results, stage="baseline", space=space, choices=choices, upstream="/up/p1.pt").manifest
    assert (m.trial_id, m.upstream, m.lineage) == ("b", "/up/p2.pt", ["pretrain:p2", "baseline:b"])
    assert m.trial_upstreams == {"a": "p1", "b": "p2"}


def test_the_trial_table_is_written_beside_the_manifest(tmp_path):
    conclude(tmp_path, [trial_result(tmp_path, "a", 0.7), trial_result(tmp_path, "b", 0.8)])
    table = json.loads((tmp_path / "exp" / "default" / "pretrain" / "trials.json").read_text())
    assert (table["stage"], table["metric"], table["mode"], table["max_epochs"]) == ("pretrain", METRIC, "max", 1)
    assert {t["trial_id"]: t["metric"] for t in table["trials"]} == {"a": 0.7, "b": 0.8}


def test_trials_the_scheduler_stopped_early_rank_after_those_that_trained_every_epoch(tmp_path):
    # A trial ASHA stopped after 1 of 4 epochs is valued on that one epoch (it barely moved from
    # the starting checkpoint); it must not win against trials that trained all 4.
    space_file = write_space(tmp_path, "baseline", fixed={"max_epoch": 4, "steps_per_epoch": 2})
    options = SearchOptions(stage="baseline", storage=str(tmp_path / "exp"), space=space_file)
    space = prepare_space(options, "baseline")
    assert space.max_epochs == 4
    said = []
    results = [trial_result(tmp_path, "one_epoch", 0.90, epochs=1), trial_result(tmp_path, "full_a", 0.80, epochs=4),
               trial_result(tmp_path, "two_epochs", 0.85, epochs=2), trial_result(tmp_path, "full_b", 0.82, epochs=4)]
    m = conclude(tmp_path, results, stage="baseline", space=space, carry_top=3, said=said).manifest
    assert m.trial_id == "full_b"
    assert [c["trial_id"] for c in m.carried] == ["full_b", "full_a", "one_epoch"]
    assert any("choosing among the 2 trial(s) that trained all 4 epoch(s); the scheduler stopped 2 earlier"
               in line for line in said)
    # No trial trained every epoch (a time budget ran out): the best of them all.
    stopped = [trial_result(tmp_path / "s", t, v, epochs=e) for t, v, e in (("x", 0.7, 1), ("y", 0.75, 2))]
    assert conclude(tmp_path / "s", stopped, stage="baseline", space=space).manifest.trial_id == "y"


def test_a_stage_whose_trials_reported_nothing_says_so(tmp_path):
    silent = trial_result(tmp_path, "quiet", 0.5)
    silent.metrics = {"note": 1}                # no metric, no epoch, no trial id: named by its folder
    outcome = conclude(tmp_path, [silent])
    assert outcome.manifest is None and outcome.error == "every trial of stage pretrain failed: no results"
    assert [(r.trial_id, r.epochs, r.outcome) for r in outcome.rows] == [("trial_quiet", 0, "stopped early")]


def test_trials_that_reported_no_checkpoint_are_a_stage_error(tmp_path):
    result = trial_result(tmp_path, "a", 0.7)
    result.checkpoint = None                    # and no checkpoint_path metric from Ray Train
    outcome = conclude(tmp_path, [result])
    assert outcome.manifest is None and outcome.error == "stage pretrain: no trial reported a checkpoint"
    assert (outcome.stage, outcome.metric, [r.trial_id for r in outcome.rows]) == ("pretrain", METRIC, ["a"])


def test_a_chosen_epoch_without_a_standard_error_records_none(tmp_path):
    result = trial_result(tmp_path, "a", 0.7)
    state_file = f"{result.checkpoint.path}/{BEST_FILE}"
    state = torch.load(state_file, weights_only=True)
    del state["metrics"][f"{METRIC}_se"]
    torch.save(state, state_file)
    assert conclude(tmp_path, [result]).manifest.metric_se is None


def test_carry_top_two_carries_two_and_exactly_k_qualifying_is_not_a_shortfall(tmp_path):
    said = []
    results = [trial_result(tmp_path, "a", 0.7, params={"lr": 0.1}), trial_result(tmp_path, "b", 0.8, params={"lr": 0.2})]
    m = conclude(tmp_path, results, carry_top=2, said=said).manifest
    assert [(c["trial_id"], c["params"]) for c in m.carried] == [("b", {"lr": 0.2}), ("a", {"lr": 0.1})]
    assert not any("qualify" in line for line in said)


def test_carried_trials_of_a_stage_that_chose_among_upstreams_name_the_upstream_each_started_from(tmp_path):
    space, choices, results = two_upstream_choices(tmp_path)
    m = conclude(tmp_path, results, stage="baseline", space=space, choices=choices, carry_top=2).manifest
    assert [(c["trial_id"], c["upstream"], c["upstream_checkpoint"]) for c in m.carried] == \
        [("b", "p2", "/up/p2.pt"), ("a", "p1", "/up/p1.pt")]


def test_several_objectives_choose_from_the_pareto_front_by_the_select_rule_and_record_it(tmp_path):
    import os

    options = SearchOptions(stage="pretrain", storage=str(tmp_path / "exp"), budget="smoke",
                            space=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                               "search_spaces", "pretrain_pareto.yaml"))
    space = prepare_space(options, "pretrain")
    # (accuracy, latency): "slow" is the most accurate but over the 10 ms bound; "dominated" loses on both.
    points = {"slow": (0.90, 14.0), "fast": (0.85, 6.0), "fastest": (0.80, 2.0), "dominated": (0.79, 7.0)}
    results = []
    for trial_id, (acc, latency) in points.items():
        result = trial_result(tmp_path, trial_id, acc, params={"arch": trial_id})
        result.metrics["latency_ms"] = latency          # a cost metric: the same in every report
        results.append(result)
    m = conclude(tmp_path, results, space=space).manifest
    assert (m.trial_id, m.metric_value) == ("fast", 0.85)
    pareto = m.pareto
    assert pareto["objectives"] == [[METRIC, "max"], ["latency_ms", "min"]]
    assert sorted(p["trial_id"] for p in pareto["front"]) == ["fast", "fastest", "slow"]
    assert sorted(p["trial_id"] for p in pareto["trials"]) == sorted(points)
    assert {p["trial_id"]: p["values"]["latency_ms"] for p in pareto["trials"]}["fast"] == 6.0
    assert pareto["select"] == space.select_rule().to_dict()
    assert pareto["plot"] == str(tmp_path / "exp" / "default" / "pretrain" / "plots" / "pareto_front.png")
    assert os.path.getsize(pareto["plot"]) > 1000


def test_a_front_with_no_trial_the_rule_accepts_is_a_stage_error_not_a_choice(tmp_path):
    import os

    options = SearchOptions(stage="pretrain", storage=str(tmp_path / "exp"), budget="smoke",
                            space=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                               "search_spaces", "pretrain_pareto.yaml"))
    space = prepare_space(options, "pretrain")
    result = trial_result(tmp_path, "slow", 0.9)
    result.metrics["latency_ms"] = 50.0
    outcome = conclude(tmp_path, [result], space=space)
    assert outcome.manifest is None and (outcome.stage, outcome.metric) == ("pretrain", METRIC)
    assert outcome.error.startswith("stage pretrain: ") and "latency_ms" in outcome.error
    assert [r.trial_id for r in outcome.rows] == ["slow"]
