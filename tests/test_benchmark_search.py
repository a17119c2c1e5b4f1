"""benchmarks/search_efficiency.py: the compute accounting, on hand-made searches, and its
smallest mode end to end (random search and TPE + ASHA through the real runner, JSON and PNGs)."""
import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "search_efficiency", os.path.join(REPO, "benchmarks", "search_efficiency.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def fake_search(trials, start=1000.0):
    """A search whose trials ran one after another, 10 s per epoch, each epoch reporting the given
    value (the trial's value under its selection rule so far) as both metric and value."""
    out, clock = [], start
    for i, values in enumerate(trials):
        epochs = []
        for e, value in enumerate(values, start=1):
            clock += 10.0
            epochs.append({"epoch": e, "metric": value, "value": value, "timestamp": clock,
                           "time_total_s": 10.0 * e})
        out.append({"trial_id": f"t{i}", "params": {}, "epochs": epochs})
    return {"trials": out, "search_start": start, "wall_s": clock - start}


def test_the_answer_after_each_epoch_is_the_best_finished_trial_by_its_final_value():
    bench = load_benchmark()
    # t0 ends at 0.7, t1 at 0.5, t2 at 0.9 (its 0.95 along the way does not count: only a finished
    # trial's final value does, which is what the selection rule gives).
    curve = bench.best_so_far_curve(fake_search([[0.6, 0.7], [0.5], [0.8, 0.95, 0.9]]))
    assert [p["compute_epochs"] for p in curve] == [1, 2, 3, 4, 5, 6]
    assert [p["best"] for p in curve] == [None, 0.7, 0.7, 0.7, 0.7, 0.9]
    assert [p["trial_id"] for p in curve] == [None, "t0", "t0", "t0", "t0", "t2"]
    assert [p["wall_s"] for p in curve] == [10, 20, 30, 40, 50, 60]
    assert bench.compute_to_reach(curve, 0.7) == 2
    assert bench.compute_to_reach(curve, 0.9) == 6
    assert bench.compute_to_reach(curve, 0.9, budget=5) is None
    assert bench.compute_to_reach(curve, 0.95) is None
    assert bench.best_within(curve, 3) == 0.7
    assert bench.chosen_trials(curve) == ["t0", "t2"]


def test_seed_summary_judges_both_at_the_same_budget_on_validation_and_on_test():
    bench = load_benchmark()
    # Random: 3 trials x 2 epochs = budget 6; its answer at 6 is r1 (0.8), test 0.70.
    random = fake_search([[0.5, 0.6], [0.7, 0.8], [0.65, 0.7]])
    random["trials"] = [dict(t, trial_id=f"r{i}") for i, t in enumerate(random["trials"])]
    # TPE + ASHA: two 1-epoch trials, then 0.82 at its 4th epoch; the 0.99 after the budget does
    # not count at equal compute, but does for the compute to reach random's test accuracy.
    tpe = fake_search([[0.5], [0.55], [0.6, 0.82], [0.4], [0.3, 0.99]])
    tests = {"random": {"r0": {"acc": 0.60}, "r1": {"acc": 0.70}},
             "tpe_asha": {"t0": {"acc": 0.55}, "t1": {"acc": 0.58}, "t2": {"acc": 0.69}, "t4": {"acc": 0.72}}}
    row = bench.seed_summary(0, {"random": random, "tpe_asha": tpe}, budget=6, tests=tests)
    assert row["random_best"] == 0.8
    assert row["random"]["compute_to_random_best"] == 4
    assert row["tpe_asha"]["compute_to_random_best"] == 4          # 0.82 >= 0.8 at its 4th epoch
    assert row["ratio_tpe_to_random"] == 1.0
    assert row["tpe_asha"]["best_within_budget"] == 0.82
    assert row["tpe_asha"]["trials_within_budget"] == 5
    assert (row["random"]["chosen_at_budget"], row["random"]["test_at_budget"]) == ("r1", 0.70)
    assert (row["tpe_asha"]["chosen_at_budget"], row["tpe_asha"]["test_at_budget"]) == ("t2", 0.69)
    # TPE + ASHA's answer reaches random's 0.70 on test only with t4, after 7 epochs: 7 / 6.
    assert row["tpe_compute_to_random_test"] == 7
    assert row["ratio_to_reach_random"] == pytest.approx(7 / 6)
    summary = bench.overall_summary([row])
    assert summary["ratio_to_reach_random"] == [pytest.approx(7 / 6)] and not summary["goal_met"]


def test_median_ratio_counts_a_seed_that_never_got_there_as_slowest():
    bench = load_benchmark()
    assert bench.median_ratio([0.2, None, 0.3]) == 0.3
    assert bench.median_ratio([0.2, None, None]) is None
    assert bench.median_ratio([0.1, 0.2, 0.3, 0.5]) == pytest.approx(0.25)


def test_the_test_difference_at_equal_budget_is_the_paired_t_test_over_seeds():
    from scipy import stats

    bench = load_benchmark()
    random_acc, tpe_acc = [0.70, 0.72, 0.69], [0.71, 0.75, 0.70]
    rows = [{"seed": s, "random": {"test_at_budget": r}, "tpe_asha": {"test_at_budget": t}}
            for s, (r, t) in enumerate(zip(random_acc, tpe_acc))]
    diff = bench.test_comparison(rows, None)
    assert diff["mean"] == pytest.approx(100 * (0.01 + 0.03 + 0.01) / 3)
    assert diff["p_value"] == pytest.approx(stats.ttest_rel(tpe_acc, random_acc).pvalue)
    assert diff["signs"] == "+++" and diff["min_detectable_effect"] > 0
    assert bench.test_comparison(rows[:1], None)["min_detectable_effect"] is None     # one seed


@pytest.mark.slow
def test_smoke_mode_runs_both_methods_and_writes_json_and_plots(tmp_path):
    import ray

    bench = load_benchmark()
    out = tmp_path / "out"
    assert not ray.is_initialized()
    report = bench.main(["--smoke", "--out", str(out), "--work-dir", str(tmp_path / "work"),
                         "--num-cpus", "2"])
    assert not ray.is_initialized()        # the Ray it started is stopped

    saved = json.loads((out / "search_efficiency_smoke.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    setup = saved["setup"]
    assert setup["budget_epochs"] == setup["random_trials"] * setup["max_epoch"] == 4
    assert setup["rule"] == "mean_last:3" and setup["spaces"]["random"]["selection"] == "mean_last:3"
    assert setup["spaces"]["random"]["searcher"]["type"] == "random"
    assert setup["spaces"]["random"]["scheduler"]["type"] == "none"
    assert setup["spaces"]["tpe_asha"]["searcher"]["type"] == "tpe"
    assert setup["spaces"]["tpe_asha"]["scheduler"]["type"] == "asha"

    [seed] = saved["per_seed"]
    assert set(seed["methods"]) == {"random", "tpe_asha"}
    random, tpe = seed["methods"]["random"], seed["methods"]["tpe_asha"]
    # Random search: every trial trains every epoch; the curve counts each one.
    assert len(random["trials"]) == setup["random_trials"]
    assert [len(t["epochs"]) for t in random["trials"]] == [setup["max_epoch"]] * setup["random_trials"]
    assert [p["compute_epochs"] for p in random["curve"]] == list(range(1, 5))
    # TPE + ASHA ran its trials, each for 1..max_epoch epochs, with metrics in [0, 1].
    assert len(tpe["trials"]) == setup["tpe_trials"]
    assert all(1 <= len(t["epochs"]) <= setup["max_epoch"] for t in tpe["trials"])
    for method in (random, tpe):
        bests = [p["best"] for p in method["curve"] if p["best"] is not None]
        assert all(0.0 <= b <= 1.0 for b in bests) and bests == sorted(bests)
        # Every trial's value is the mean of its last (up to) 3 epochs' validation accuracy.
        for t in method["trials"]:
            accs = [e["metric"] for e in t["epochs"]]
            assert t["epochs"][-1]["value"] == pytest.approx(sum(accs[-3:]) / len(accs[-3:]))
        # The trials chosen along the way were scored on the test pairs.
        assert method["test"] and all(0.0 <= v["acc"] <= 1.0 for v in method["test"].values())
    assert seed["summary"]["random_best"] == max(t["epochs"][-1]["value"] for t in random["trials"])
    summary = json.loads((out / "summary_smoke.json").read_text())
    assert summary["seeds"] == [0] and summary["budget"]["epochs"] == 4
    assert summary["n_test_pairs"] == {"test_synth_cfp_fp": 100}
    assert summary["rule"].startswith("mean validation synth_cfp_fp_acc over the last 3 epochs")
    assert summary["test_accuracy_at_budget"]["random"] == [seed["summary"]["random"]["test_at_budget"]]
    assert set(summary["ratio_to_reach_random"]) == {"per_seed", "median", "goal", "goal_met"}
    assert set(summary["test_difference"]) >= {"mean", "ci95", "p_value"}

    for name in ("best_so_far_smoke.png", "optuna_optimization_history_smoke.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    # 3 trials, some pruned by ASHA: too few completed ones for an importance estimate.
    assert not (out / "optuna_param_importances_smoke.png").exists()
    assert saved["plots"]["best_so_far"] == "best_so_far_smoke.png"
