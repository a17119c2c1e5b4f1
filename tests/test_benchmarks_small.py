"""Each benchmark runs in its smallest mode and writes its figures (no timing is asserted)."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args, timeout=600):
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", name), *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_gpu_throughput_cpu_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    stdout = run_script("gpu_throughput.py", "--cpu-smoke", "--out", str(out))
    results = json.loads(out.read_text())["results"]
    assert set(results) == {f"{m}/{c}" for m in ("pretrain", "virface")
                            for c in ("fp32", "bf16", "bf16+channels_last")}
    assert all(r["images_per_s"] > 0 for r in results.values())
    assert "virface / pretrain throughput" in stdout


def test_gpu_suite_cpu_smoke(tmp_path):
    out = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_suite.sh"), "--cpu-smoke"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    steps = json.loads((tmp_path / "steps.json").read_text())["results"]
    assert "batch 256, 2M ids, full softmax" in steps
    assert all(r["images_per_s"] > 0 for r in steps.values())
    loop = json.loads((tmp_path / "loop.json").read_text())
    assert loop["loop_images_per_s"] > 0 and 0 < loop["loop_over_step"]


def test_data_eval_quick(tmp_path):
    out = tmp_path / "data.json"
    run_script("data_eval.py", "--quick", "--out", str(out))
    figures = json.loads(out.read_text())
    assert {"recordio (JPEG), 1 worker(s)", "recordio (JPEG), 2 worker(s)",
            "image folder (PNG), 1 worker(s)", "image folder (PNG), 2 worker(s)"} <= set(figures)
    assert 0 < figures["verify_10fold_6000_pairs_s"] < math.inf


@pytest.mark.slow
def test_throughput_smoke(tmp_path, shared_ray):
    # Its trials on the test process's shared Ray ($RAY_ADDRESS), as on a user's cluster.
    out = tmp_path / "throughput.json"
    stdout = run_script("throughput.py", "--smoke", "--out", str(out), timeout=900)
    figures = json.loads(out.read_text())
    for key in ("bare_pretrain", "ddp_handwritten_pretrain_w2", "core_pretrain", "core_virface",
                "ray_pretrain_w1", "ray_pretrain_w2", "ray_virface_w1", "ray_virface_w2",
                "overhead_one_process_s", "overhead_noop_tune_s", "overhead_trial_w1_s"):
        assert figures[key] > 0, key
    assert "overhead_trial_w2_s" not in figures and "not measured with --smoke" in stdout
    assert "ratio to core loop" in stdout
    assert "2-worker Ray Train trial / hand-written 2-process DDP" in stdout


def test_partial_fc_cpu_smoke(tmp_path):
    out = tmp_path / "partial_fc.json"
    stdout = run_script("partial_fc_cpu.py", "--smoke", "--out", str(out))
    rates = json.loads(out.read_text())["rates"]
    assert set(rates) == {"0.1", "1.0"}
    assert rates["0.1"]["columns"] == 200 and rates["1.0"]["columns"] == 2000    # of 2,000 classes
    assert rates["0.1"]["saved_for_backward_mb"] < rates["1.0"]["saved_for_backward_mb"]
    assert all(0 < r["head_share"] < 1 for r in rates.values())
    assert "r = 0.1 / r = 1.0: head time" in stdout


def test_suite_time_lists_the_costliest_tests_with_their_cpu(tmp_path):
    (tmp_path / "test_two.py").write_text("def test_idle():\n    pass\n\n\n"
                                          "def test_busy():\n    sum(i * i for i in range(3_000_000))\n")
    out = tmp_path / "suite.json"
    stdout = run_script("suite_time.py", "--top", "1", "--out", str(out), "--rootdir", str(tmp_path),
                        str(tmp_path / "test_two.py"))
    figures = json.loads(out.read_text())
    assert {t["test"].split("::")[1] for t in figures["tests"]} == {"test_idle", "test_busy"}
    busy = next(t for t in figures["tests"] if t["test"].endswith("test_busy"))
    assert busy["cpu_s"] > 0 and figures["cpu_s"] >= busy["cpu_s"] > 0
    # Only the costliest is listed: the busy one.
    listed = stdout.split("test (the 1 costliest)")[1].strip().splitlines()
    assert len(listed) == 1 and listed[0].endswith("test_two.py::test_busy")
    assert "2 tests in" in stdout and "with every core busy all the time" in stdout
