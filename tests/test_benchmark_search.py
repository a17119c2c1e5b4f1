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
    """A search whose trials ran one after another, 10 s per epoch, with the given metrics."""
    out, clock = [], start
    for i, metrics in enumerate(trials):
        epochs = []
        for e, value in enumerate(metrics, start=1):
            clock += 10.0
            epochs.append({"epoch": e, "metric": value, "timestamp": clock, "time_total_s": 10.0 * e})
        out.append({"trial_id": f"t{i}", "params": {}, "epochs": epochs})
    return {"trials": out, "search_start": start, "wall_s": clock - start}


def test_compute_counts_every_epoch_in_completion_order_and_keeps_the_best_so_far():
    bench = load_benchmark()
    curve = bench.best_so_far_curve(fake_search([[0.6, 0.7], [0.5], [0.8, 0.75, 0.9]]))
    assert [p["compute_epochs"] for p in curve] == [1, 2, 3, 4, 5, 6]
    assert [p["best"] for p in curve] == [0.6, 0.7, 0.7, 0.8, 0.8, 0.9]
    assert [p["wall_s"] for p in curve] == [10, 20, 30, 40, 50, 60]
    # 0.8 is first reached at the 4th epoch run; 0.9 at the 6th; 0.95 never.
    assert bench.compute_to_reach(curve, 0.8) == 4
    assert bench.compute_to_reach(curve, 0.9) == 6
    assert bench.compute_to_reach(curve, 0.9, budget=5) is None
    assert bench.compute_to_reach(curve, 0.95) is None
    assert bench.best_within(curve, 3) == 0.7


def test_seed_summary_compares_against_random_searchs_best_within_the_budget():
    bench = load_benchmark()
    # Random: 3 trials x 2 epochs = budget 6, best 0.8 reached at epoch 4.
    random = fake_search([[0.5, 0.6], [0.7, 0.8], [0.65, 0.7]])
    # TPE + ASHA: two 1-epoch trials, then 0.82 at its 4th epoch; the 0.99 at epoch 7 is past the
    # budget and must not count.
    tpe = fake_search([[0.5], [0.55], [0.6, 0.82], [0.4], [0.3, 0.99]])
    row = bench.seed_summary(0, {"random": random, "tpe_asha": tpe}, budget=6)
    assert row["random_best"] == 0.8
    assert row["random"]["compute_to_random_best"] == 4
    assert row["tpe_asha"]["compute_to_random_best"] == 4
    assert row["ratio_tpe_to_random"] == 1.0
    assert row["tpe_asha"]["best_within_budget"] == 0.82
    assert row["tpe_asha"]["trials_within_budget"] == 5
    summary = bench.overall_summary([row])
    assert summary["tpe_reached_random_best"] == 1 and not summary["goal_met_every_seed"]


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
        bests = [p["best"] for p in method["curve"]]
        assert all(0.0 <= b <= 1.0 for b in bests) and bests == sorted(bests)
    assert seed["summary"]["random_best"] == max(e["metric"] for t in random["trials"] for e in t["epochs"])

    for name in ("best_so_far_smoke.png", "optuna_optimization_history_smoke.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    # 3 trials, some pruned by ASHA: too few completed ones for an importance estimate.
    assert not (out / "optuna_param_importances_smoke.png").exists()
    assert saved["plots"]["best_so_far"] == "best_so_far_smoke.png"
