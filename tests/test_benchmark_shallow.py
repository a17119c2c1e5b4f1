"""benchmarks/shallow_data.py in its smallest mode: every arm of every seed chosen on validation
pairs and reported on test pairs, summary.json in the schema RESULTS.md describes, and the same
summary again from results.json alone."""
import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "shallow_data", os.path.join(REPO, "benchmarks", "shallow_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    bench = load_benchmark()
    tmp = tmp_path_factory.mktemp("shallow")
    out = tmp / "out"
    bench.main(["--smoke", "--processes", "1", "--out", str(out), "--work", str(tmp / "work")])
    return bench, out


def test_every_arm_of_every_seed_is_chosen_on_validation_and_reported_on_test(smoke_run):
    bench, out = smoke_run
    saved = json.loads((out / "results.json").read_text())
    plan = saved["plan"]
    assert plan["name"] == "smoke"
    arms = [r for r in saved["records"] if r["kind"] == "arm"]
    assert sorted((r["arm"], r["seed"]) for r in arms) == sorted(
        (a, s) for a in plan["arms"] for s in plan["seeds"])
    for run in arms:
        # Every epoch scored on validation only; the best one is then scored on test, once.
        assert len(run["epochs"]) == plan["continue_epochs"]
        for epoch in run["epochs"]:
            assert "synth_cfp_fp_acc" in epoch and not any(k.startswith("test_") for k in epoch)
        # The smoke plan's rule, mean_last:3, over its 2 epochs: best.pt is the last epoch, the
        # run's validation value the mean of both epochs.
        assert plan["rule"] == "mean_last:3" and run["chosen"]["epoch"] == 2
        both = [e["synth_cfp_fp_acc"] for e in run["epochs"]]
        assert run["chosen"]["synth_cfp_fp_acc"] == pytest.approx(sum(both) / 2, abs=1e-6)
        assert 0.0 <= run["chosen"]["test_synth_cfp_fp_acc"] <= 1.0
        # Per-pair outcomes of the test set, as many as it has pairs, agreeing with its accuracy.
        correct = bench.unpack_bools(run["test_correct"]["synth_cfp_fp"], 40)
        assert correct.mean() == pytest.approx(run["chosen"]["test_synth_cfp_fp_acc"])
        # The same dropout for every arm, the baseline and the oracle included.
        assert run["config"]["dropout"] == plan["dropout"]
    # Training, validation and test identities are apart.
    data = saved["data"]
    assert data["train_ids"] > 0 and data["val_ids"] > 0 and data["test_ids"] > 0


def test_the_oracle_batches_like_virface_with_one_head_row_per_shallow_identity(smoke_run):
    bench, out = smoke_run
    saved = json.loads((out / "results.json").read_text())
    from virface.checkpoint import load_checkpoint

    starts = next(r for r in saved["records"] if r["kind"] == "starts")
    oracle = next(r for r in saved["records"] if r["kind"] == "arm" and r["arm"] == "oracle")
    assert oracle["config"]["method"] == "baseline"
    assert oracle["config"]["unlabel_batch_size"] == saved["plan"]["unlabel_batch_size"]
    path = os.path.join(os.path.dirname(out), "work", f"seed{starts['seed']}", "oracle_start.pt")
    head = load_checkpoint(path)["head"]["weight"]
    assert head.shape[0] == data_ids(saved)


def data_ids(saved):
    return saved["data"]["deep_ids"] + saved["data"]["shallow_ids"]


def test_summary_json_has_the_documented_schema_and_picks_the_variant_on_validation(smoke_run):
    bench, out = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == 2
    assert summary["select_on"] == ["synth_lfw", "synth_cfp_ff", "synth_cfp_fp"]      # the smoke plan scores all
    assert summary["report_on"] == ["test_synth_lfw", "test_synth_cfp_ff", "test_synth_cfp_fp"]
    stats_keys = {"gain_se", "ci95", "p_value", "t", "signs", "ci95_seeds_and_pairs",
                  "p_value_seeds_and_pairs", "se_seeds_and_pairs", "se_pairs_only"}
    assert set(summary["oracle_gain"]) == {"mean", "std"} | stats_keys
    assert set(summary["methods"]) == {"virclass", "virface"}
    assert set(summary["methods"]["virclass"]) == {"gain_mean", "gain_std"} | stats_keys
    assert set(summary["virface_minus_virclass"]) == {"mean", "std"} | stats_keys
    assert summary["rule"].startswith("mean validation synth_cfp_fp_acc over the last 3 epochs")
    assert summary["n_test_pairs"] == {"test_synth_lfw": 40, "test_synth_cfp_ff": 40, "test_synth_cfp_fp": 40}
    assert summary["min_detectable_effect"] > 0
    assert set(summary["eval_cost_s"]) == {"synth_lfw", "synth_cfp_ff", "synth_cfp_fp", "test_synth_lfw",
                                           "test_synth_cfp_ff", "test_synth_cfp_fp"}
    saved = json.loads((out / "results.json").read_text())
    full = saved["summary"]
    variant = summary["methods"]["virface"]["variant"]
    val = {a: full["arms"][a]["synth_cfp_fp_acc"]["mean"] for a in full["arms"] if a.startswith("virface:")}
    assert val[f"virface:{variant}"] == max(val.values())
    # A gain is the paired test difference to the baseline, in points.
    per_seed = {r["seed"]: r["chosen"]["test_synth_cfp_fp_acc"] for r in saved["records"]
                if r["kind"] == "arm" and r["arm"] == "virclass"}
    base = {r["seed"]: r["chosen"]["test_synth_cfp_fp_acc"] for r in saved["records"]
            if r["kind"] == "arm" and r["arm"] == "baseline"}
    expected = sum(100 * (per_seed[s] - base[s]) for s in base) / len(base)
    assert summary["methods"]["virclass"]["gain_mean"] == pytest.approx(expected)
    # Its p-value is the paired t-test's over seeds (scipy's, on the same per-seed accuracies).
    from scipy import stats

    seeds = sorted(base)
    diffs = [per_seed[s] - base[s] for s in seeds]
    if len(set(round(d, 9) for d in diffs)) > 1:
        want = stats.ttest_rel([per_seed[s] for s in seeds], [base[s] for s in seeds]).pvalue
        assert summary["methods"]["virclass"]["p_value"] == pytest.approx(want)
    lo, hi = summary["methods"]["virclass"]["ci95"]
    assert lo <= expected <= hi


def test_every_variants_instances_are_measured_by_the_gate_before_its_arm_trains(smoke_run):
    bench, out = smoke_run
    saved = json.loads((out / "results.json").read_text())
    figures = {"vi_draw_cos", "vi_real_cos", "vi_identity_keep", "vi_w_pull", "vi_own_class_share"}
    starts = [r for r in saved["records"] if r["kind"] == "starts"]
    assert len(starts) == len(saved["plan"]["seeds"])
    for record in starts:
        assert set(record["gates"]) == set(saved["plan"]["variants"])
        assert all(set(g) == figures for g in record["gates"].values())
        # Covariance transfer draws from no trained generator: its figures are not the VAE's.
        assert record["gates"]["covariance"] != record["gates"]["alternate"]
    gate = json.loads((out / "summary.json").read_text())["instance_gate"]
    assert set(gate) == set(saved["plan"]["variants"])
    keep = [r["gates"]["covariance"]["vi_identity_keep"] for r in starts]
    assert gate["covariance"]["vi_identity_keep"] == pytest.approx(sum(keep) / len(keep))
    assert gate["covariance"]["kept_identity_every_seed"] == all(k >= 0 for k in keep)
    assert any(line.startswith("gate covariance: identity keep") for line in saved["verdict"])


def test_tables_and_plot_are_written_and_rebuilt_from_results_json(smoke_run, tmp_path, capsys):
    bench, out = smoke_run
    table = (out / "table.md").read_text()
    for label in ("ArcFace baseline", "VirClass", "VirFace alternate", "VirFace residual",
                  "VirFace covariance", "oracle"):
        assert label in table
    for name in ("gains.png", "curves.png"):
        png = (out / name).read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 10_000, name
    again = tmp_path / "again"
    bench.main(["--from-json", str(out / "results.json"), "--out", str(again)])
    assert json.loads((again / "summary.json").read_text()) == json.loads((out / "summary.json").read_text())


# Validation accuracy per epoch of a hand-made run: the best epoch is 3; the last three average 0.7.
EPOCHS = [{"epoch": e, "synth_cfp_fp_acc": a} for e, a in enumerate([0.60, 0.74, 0.80, 0.62, 0.68], 1)]


@pytest.mark.parametrize("rule, epoch, value", [
    ("best", 3, 0.80), ("last", 5, 0.68), ("mean_last:3", 5, (0.80 + 0.62 + 0.68) / 3)])
def test_each_rule_chooses_the_epoch_and_validation_value_worked_out_by_hand(rule, epoch, value):
    bench = load_benchmark()
    chosen = bench.chosen_epoch(EPOCHS, rule, ["synth_cfp_fp_acc"])
    assert chosen["epoch"] == epoch and chosen["synth_cfp_fp_acc"] == pytest.approx(value)


def test_the_rule_and_the_pair_counts_are_options_fixed_before_the_run(tmp_path):
    bench = load_benchmark()
    plan = bench.plan_of(bench.parse_args(["--rule", "last", "--test-pairs", "40000"]))
    assert plan.rule == "last" and plan.synthetic["test_pairs"] == 40000
    assert bench.PLANS["full"].rule == "mean_last:3" and bench.PLANS["full"].synthetic["test_pairs"] >= 20000
    with pytest.raises(Exception, match="rule: 'mean_last:0'"):
        bench.plan_of(bench.parse_args(["--rule", "mean_last:0"]))
    with pytest.raises(SystemExit, match="test_pairs: 20001 is not divisible by 20"):
        bench.main(["--test-pairs", "20001", "--out", str(tmp_path)])
