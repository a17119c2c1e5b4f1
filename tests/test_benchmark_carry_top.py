"""benchmarks/carry_top.py: the paired summary on hand-made records, and its smallest mode end to
end (both chains through the real runner): both arms per seed with test and validation figures,
the carry arm's lineage and choices, and every choice made on validation."""
import importlib.util
import json
import os
import sys

import pytest
from scipy.stats import ttest_rel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    spec = importlib.util.spec_from_file_location("carry_top", os.path.join(REPO, "benchmarks", "carry_top.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def record(arm, seed, test, val):
    return {"arm": arm, "seed": seed, "test": test, "val": val}


def test_the_difference_is_paired_per_seed_in_points():
    bench = load_benchmark()
    records = [record("greedy", 1, 0.80, 0.81), record("top2", 1, 0.83, 0.82),
               record("greedy", 2, 0.90, 0.90), record("top2", 2, 0.89, 0.90),
               record("greedy", 3, 0.70, 0.75), record("top2", 3, 0.75, 0.74)]
    summary = bench.summarize(records, 2)
    diff = summary["test_diff_points"]
    # Differences +3, -1, +5 points: mean 7/3, sample std sqrt(((2/3)^2 + (10/3)^2 + (8/3)^2) / 2) = sqrt(28/3).
    assert diff["per_seed"] == pytest.approx({"1": 3.0, "2": -1.0, "3": 5.0})
    assert diff["mean"] == pytest.approx(7 / 3) and diff["std"] == pytest.approx((28 / 3) ** 0.5)
    assert diff["signs"] == "+-+"
    # SE = std / sqrt(3); t = mean / SE on 2 degrees of freedom; p as scipy's paired t-test says.
    assert diff["se"] == pytest.approx((28 / 9) ** 0.5) and diff["t"] == pytest.approx(7 / 3 / (28 / 9) ** 0.5)
    assert diff["p_value"] == pytest.approx(ttest_rel([0.83, 0.89, 0.75], [0.80, 0.90, 0.70]).pvalue)
    assert diff["ci95"] == pytest.approx([7 / 3 - 4.302653 * (28 / 9) ** 0.5, 7 / 3 + 4.302653 * (28 / 9) ** 0.5],
                                         abs=1e-5)
    assert summary["arms"]["greedy"]["test"]["mean"] == pytest.approx(0.8)
    assert summary["val_diff_points"]["per_seed"]["2"] == pytest.approx(0.0)


def test_each_seed_seeds_the_sampler_and_the_training_of_every_stage_and_keeps_the_shipped_budget():
    bench = load_benchmark()
    full = bench.MODES["full"]
    for stage in bench.CHAIN:
        space = bench.seeded_space(full, stage, 3)
        assert space["searcher"]["seed"] == 3 and space["fixed"]["seed"] == 3
    virface = bench.seeded_space(full, "virface", 2)
    assert virface["budget"]["num_samples"] == 4 and virface["fixed"]["max_epoch"] == 4
    # The smoke mode's one epoch: no ASHA grace period beyond it.
    smoke = bench.seeded_space(bench.MODES["smoke"], "pretrain", 1)
    assert smoke["scheduler"]["grace_period"] == 1 and smoke["budget"]["num_samples"] == 2


@pytest.mark.slow
def test_smoke_run_has_both_arms_per_seed_chosen_on_validation(tmp_path, connected_ray):
    # Its searches on the Ray this process is connected to (the shared head), as run_search does.
    bench = load_benchmark()
    out = tmp_path / "out"
    bench.main(["--smoke", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    saved = json.loads((out / "results.json").read_text())
    plan = saved["plan"]
    assert plan["arms"] == ["greedy", "top2"]
    assert sorted((r["arm"], r["seed"]) for r in saved["records"]) == sorted(
        (a, s) for a in plan["arms"] for s in plan["seeds"])
    for run in saved["records"]:
        assert run["val_metric"] == "synth_cfp_fp_acc" and run["test_metric"] == "test_synth_cfp_fp_acc"
        assert 0.0 <= run["test"] <= 1.0 and 0.0 <= run["val"] <= 1.0
        # Every stage chose its trial on validation: the best of its trial table, not on test.
        for stage, st in run["stages"].items():
            assert not st["metric"].startswith("test_")
            values = [t["metric"] for t in st["trials"] if t["metric"] is not None]
            assert st["value"] == (max(values) if st["mode"] == "max" else min(values)), stage
        assert [step.split(":")[0] for step in run["lineage"]] == list(bench.CHAIN)
    for seed in plan["seeds"]:
        greedy, top = ({r["arm"]: r for r in saved["records"] if r["seed"] == seed}[a] for a in plan["arms"])
        # The same pretrain search for both; only the carry arm passes two trials on and the
        # next stages choose among them.
        assert greedy["stages"]["pretrain"]["trial_id"] == top["stages"]["pretrain"]["trial_id"]
        assert len(top["stages"]["pretrain"]["carried"]) == 2 and not greedy["stages"]["pretrain"]["carried"]
        # Greedy's chain starts at the best pretrain trial; the carry arm's final chain may start at
        # either carried trial (that it can descend from the runner-up is the point of carrying).
        assert greedy["lineage"][0] == "pretrain:" + greedy["stages"]["pretrain"]["trial_id"]
        assert top["lineage"][0] in {"pretrain:" + c["trial_id"] for c in top["stages"]["pretrain"]["carried"]}
        for stage in ("generator", "virface"):
            assert set(top["stages"][stage]["trial_upstreams"].values()) <= {
                c["trial_id"] for c in top["stages"][bench.CHAIN[bench.CHAIN.index(stage) - 1]]["carried"]}
            assert top["stages"][stage]["trial_upstreams"] and not greedy["stages"][stage]["trial_upstreams"]
    budgets = plan["budgets"]
    assert {s: (b["trials"], b["max_epoch"], b["steps_per_epoch"]) for s, b in budgets.items()} == {
        "pretrain": (2, 1, 3), "generator": (2, 1, 3), "virface": (2, 1, 3)}
    table = (out / "table.md").read_text()
    assert "top2 - greedy" in table and "18 steps per arm" in table
