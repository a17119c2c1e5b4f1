"""virface-search --compare: every arm searched with the same budget, winners retrained with
seeds, paired test differences to the baseline."""
import json
import os
import subprocess
import sys

import pytest
from scipy.stats import ttest_rel

from virface.errors import ConfigError
from virface.search.compare import comparison_arms, comparison_table, summarise
from virface.search.manifest import StageManifest
from virface.search.runner import SearchOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_arms_must_include_the_baseline_and_train_the_backbone():
    assert comparison_arms(SearchOptions(stage="virface", compare="virclass,baseline")) == \
        ["virface", "virclass", "baseline"]
    with pytest.raises(ConfigError, match="add it: --compare virclass,baseline"):
        comparison_arms(SearchOptions(stage="virface", compare="virclass"))
    with pytest.raises(ConfigError, match="stage generator does not train the backbone"):
        comparison_arms(SearchOptions(stage="virface", compare="generator,baseline"))


def manifest(stage, value):
    return StageManifest(stage=stage, experiment="e", trial_id=f"{stage}1", config={"lr": 0.01},
                         metric_name="lfw_acc", metric_value=value, metric_mode="max", checkpoint="/c.pt")


def test_differences_are_paired_seed_by_seed_on_the_hardest_test_set():
    runs = {"baseline": [{"seed": 1, "test_lfw_acc": 0.90, "test_cfp_fp_acc": 0.80},
                         {"seed": 2, "test_lfw_acc": 0.91, "test_cfp_fp_acc": 0.70},
                         {"seed": 3, "test_lfw_acc": 0.91, "test_cfp_fp_acc": 0.75}],
            "virclass": [{"seed": 1, "test_lfw_acc": 0.95, "test_cfp_fp_acc": 0.81},
                         {"seed": 2, "test_lfw_acc": 0.80, "test_cfp_fp_acc": 0.73},
                         {"seed": 3, "test_lfw_acc": 0.80, "test_cfp_fp_acc": 0.77}]}
    result = summarise(["virclass", "baseline"], {"num_samples": 2}, {s: manifest(s, 0.9) for s in runs}, runs, 3)
    assert result["report_on"] == "test_cfp_fp_acc"                   # cfp_fp is the harder set
    diff = result["differences_to_baseline"]["virclass"]
    # Differences 1, 3, 2 points: mean 2, std 1, SE 1/sqrt(3), t = 2 sqrt(3) on 2 degrees of freedom.
    assert diff["per_seed"] == pytest.approx([1.0, 3.0, 2.0]) and diff["signs"] == "+++"
    assert diff["mean"] == pytest.approx(2.0) and diff["std"] == pytest.approx(1.0)
    assert diff["se"] == pytest.approx(3 ** -0.5) and diff["t"] == pytest.approx(2 * 3 ** 0.5)
    # scipy's paired t-test on the same accuracies, and t_{0.975, 2} = 4.302653 for the interval
    assert diff["p_value"] == pytest.approx(ttest_rel([0.81, 0.73, 0.77], [0.80, 0.70, 0.75]).pvalue)
    assert diff["ci95"] == pytest.approx([2 - 4.302653 / 3 ** 0.5, 2 + 4.302653 / 3 ** 0.5], abs=1e-5)
    table = comparison_table(result)
    assert "| virclass | virclass1 | 0.9000 | 77.00 ± 4.00 | +2.00 ± 0.58 | [-0.48, +4.48] | 0.0742 | +++ |" in table
    assert "not distinguishable from 0 at 0.05" in table


def test_with_per_pair_correctness_the_difference_also_gets_an_interval_over_seeds_and_pairs():
    import numpy as np

    runs = {"baseline": [{"seed": 1, "test_lfw_acc": 0.5}, {"seed": 2, "test_lfw_acc": 0.5}],
            "virclass": [{"seed": 1, "test_lfw_acc": 0.75}, {"seed": 2, "test_lfw_acc": 0.5}]}
    # 4 pairs; virclass seed 1 gets one more pair right than the baseline: +25 and 0 points.
    correct = {"baseline": np.array([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=bool),
               "virclass": np.array([[1, 1, 1, 0], [1, 0, 1, 0]], dtype=bool)}
    result = summarise(["virclass", "baseline"], {"num_samples": 1}, {s: manifest(s, 0.9) for s in runs},
                       runs, 2, correct)
    both = result["differences_to_baseline"]["virclass"]["seeds_and_pairs"]
    assert both["mean"] == pytest.approx(12.5) and both["n_seeds"] == 2 and both["n_pairs"] == 4
    # virclass is never wrong where the baseline is right, so no draw is below 0; a draw above
    # 50 needs seed 1 twice and its one discordant pair drawn 3+ times of 4 (p = 1/4 x 0.051).
    assert 0.0 <= both["ci95"][0] <= 12.5 <= both["ci95"][1] <= 50.0
    assert "seeds and pairs resampled" in comparison_table(result)


def test_one_seed_gives_a_difference_without_an_interval():
    runs = {"baseline": [{"seed": 1, "test_lfw_acc": 0.90}], "virclass": [{"seed": 1, "test_lfw_acc": 0.95}]}
    result = summarise(["virclass", "baseline"], {"num_samples": 1}, {s: manifest(s, 0.9) for s in runs}, runs, 1)
    diff = result["differences_to_baseline"]["virclass"]
    assert diff["mean"] == pytest.approx(5.0) and diff["se"] is None and diff["p_value"] is None
    assert "+5.00 (one seed)" in comparison_table(result)


@pytest.mark.slow
def test_a_smoke_comparison_searches_retrains_and_reports(tmp_path, shared_ray):
    command = [sys.executable, os.path.join(REPO, "tune", "run_search.py"), "--stage", "virclass",
               "--compare", "baseline", "--budget", "smoke", "--seeds", "2", "--storage", str(tmp_path / "exp")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "each arm 1 trial(s) x up to 1 epoch(s) x 3 step(s) = at most 3 training steps" in done.stdout
    folder = tmp_path / "exp" / "default" / "comparison"
    result = json.loads((folder / "comparison.json").read_text())
    assert result["arms"] == ["virclass", "baseline"] and result["report_on"] == "test_synth_cfp_fp_acc"
    assert [r["seed"] for r in result["by_arm"]["virclass"]["runs"]] == [1, 2]
    assert len(result["differences_to_baseline"]["virclass"]["signs"]) == 2
    assert (folder / "paired_differences.png").stat().st_size > 1000
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "the comparison finished earlier" in again.stdout
