"""benchmarks/data_calibration.py in its smallest mode prints the width curve and the oracle
tables, writes them with the raw numbers, and imports neither Ray nor Optuna."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the benchmark as a script, then fails if anything Ray or Optuna got imported on the way.
RUNNER = """
import runpy, sys
sys.argv = ["data_calibration.py", "--smoke", "--out", sys.argv[1], "--work", sys.argv[2]]
runpy.run_path("benchmarks/data_calibration.py", run_name="__main__")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "optuna"))
assert not loaded, loaded
"""


def test_smoke_mode_prints_and_writes_both_tables_without_ray(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO,
           "VIRFACE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(out), str(work)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout

    saved = json.loads((out / "calibration.json").read_text())
    plan = saved["plan"]
    assert plan["name"] == "smoke" and saved["data"]["renderer_version"] == 4

    # Width curve: one row per shape of each group, each trained for max(width_steps steps,
    # width_min_passes passes): smoke has 2 steps or 1 pass of 4-image batches.
    rows = saved["width"]["rows"]
    shapes = [("fixed_budget", *s) for s in plan["fixed_budget"]] + [("fixed_depth", *s) for s in plan["fixed_depth"]]
    assert [(r["group"], r["ids"], r["images_per_id"]) for r in rows] == shapes
    assert [r["steps"] for r in rows] == [4, 4, 2, 4]          # 16, 16, 8 and 16 images
    for r in rows:
        assert r["images"] == r["ids"] * r["images_per_id"]
        for name in ("synth_lfw", "synth_cfp_ff", "synth_cfp_fp"):
            assert 0.0 <= r["final"][f"{name}_acc"] <= 1.0

    # Oracle: both arms per seed, same steps; the oracle's steps carry deep + shallow images.
    oracle = saved["oracle"]
    assert [r["seed"] for r in oracle["rows"]] == plan["seeds"]
    for r in oracle["rows"]:
        assert r["labeled_only"]["steps"] == r["oracle"]["steps"]
        assert r["labeled_only"]["images_per_step"] == plan["label_batch_size"]
        assert r["oracle"]["images_per_step"] == plan["label_batch_size"] + plan["unlabel_batch_size"]
        gain = 100 * (r["oracle"]["final"]["synth_cfp_fp_acc"] - r["labeled_only"]["final"]["synth_cfp_fp_acc"])
        assert abs(r["gain"]["synth_cfp_fp"] - gain) < 1e-9
    summary = oracle["summary"]["synth_cfp_fp"]
    gains = [r["gain"]["synth_cfp_fp"] for r in oracle["rows"]]
    assert abs(summary["gain_mean"] - sum(gains) / len(gains)) < 1e-9
    # Two seeds: the paired (sample) std of two differences is |d1 - d2| / sqrt(2).
    assert abs(summary["gain_paired_std"] - abs(gains[0] - gains[1]) / 2 ** 0.5) < 1e-9
    assert set(oracle["summary"]["checks"]) == {"gain >= 2 points on synth_cfp_fp",
                                                "gain > 3 paired stds on synth_cfp_fp"}

    # The same tables are printed and written.
    table = (out / "calibration.md").read_text()
    for text in (printed, table):
        assert "Width curve" in text and "| fixed image budget | 4 | 4 | 16 | 4 |" in text
        assert "| fixed images / id | 4 | 2 | 8 | 2 |" in text
        assert "| 0 | " in text and "| 1 | " in text and "| mean (gain ± paired std) |" in text
        for check in oracle["summary"]["checks"]:
            assert any(line.startswith(f"- {check}: ") and line.endswith(("PASS", "FAIL"))
                       for line in text.splitlines())
    assert (out / "preview.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # --from-json rewrites the same markdown from the JSON alone.
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "benchmarks/data_calibration.py", "--from-json",
                           str(out / "calibration.json"), "--out", str(again)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (again / "calibration.md").read_text() == table
