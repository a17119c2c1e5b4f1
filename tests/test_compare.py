"""virface-search --compare: every arm searched with the same budget, winners retrained with
seeds, paired test differences to the baseline."""
import json
import os
import subprocess
import sys

import pytest

from virface.errors import ConfigError
from virface.search.compare import comparison_arms, summarise
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
                         {"seed": 2, "test_lfw_acc": 0.91, "test_cfp_fp_acc": 0.70}],
            "virclass": [{"seed": 1, "test_lfw_acc": 0.95, "test_cfp_fp_acc": 0.81},
                         {"seed": 2, "test_lfw_acc": 0.80, "test_cfp_fp_acc": 0.73}]}
    result = summarise(["virclass", "baseline"], {"num_samples": 2}, {s: manifest(s, 0.9) for s in runs}, runs, 2)
    assert result["report_on"] == "test_cfp_fp_acc"                   # cfp_fp is the harder set
    diff = result["differences_to_baseline"]["virclass"]
    assert diff["per_seed"] == pytest.approx([1.0, 3.0]) and diff["signs"] == "++"
    assert diff["mean"] == pytest.approx(2.0) and diff["std"] == pytest.approx(2 ** 0.5)
    assert diff["over_2_paired_stds"] is False                        # 2.0 < 2 x 1.41


@pytest.mark.slow
def test_a_smoke_comparison_searches_retrains_and_reports(tmp_path):
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


def test_paired_differences_are_in_points_and_a_rounding_tie_is_a_tie():
    from virface.metrics import paired_differences

    d = paired_differences([0.3 + 0.6, 0.5, 0.7], [0.9, 0.4, 0.8])      # 0.3 + 0.6 != 0.9 in floats
    assert d["values"] == pytest.approx([0.0, 10.0, -10.0]) and d["signs"] == "0+-"
    assert d["mean"] == pytest.approx(0.0) and d["std"] == pytest.approx(10.0)
    assert paired_differences([0.9], [0.8])["std"] is None
