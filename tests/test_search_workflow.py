"""The search as a user drives it end to end: run-size options for the whole chain, progress
during evaluation, --list, the records that tie the tools together, and a stop that names
the command continuing it."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from virface.search.manifest import read_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tune", "run_search.py")
pytestmark = pytest.mark.slow


def run(args, cwd, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_a_chain_with_run_size_options_reports_evaluation_and_lists_itself(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = tmp_path / "exp"
    args = ["--stage", "generator", "--budget", "smoke", "--storage", str(storage), "--max_epoch", "2",
            "--steps_per_epoch", "2", "--seed", "3", "--num-samples", "1"]
    done = run(args, str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "for every stage: num_samples=1, max_epoch=2, steps_per_epoch=2, seed=3 (options given; " \
           "they override each search space)" in out
    # A line per pair set scored, after each epoch: 3 validation and 3 test sets on the synthetic faces.
    evaluated = [line for line in out.splitlines() if "evaluated synth_" in line or "evaluated test_synth_" in line]
    assert any("| epoch 1/2 evaluated synth_lfw (1/6): 100 pairs, " in line and "pairs/s | evaluation " in line
               for line in evaluated), out[-3000:]
    for stage in ("pretrain", "generator"):
        manifest = read_manifest(storage / "default" / stage / "best.json")
        assert manifest.overrides == {"num_samples": 1, "max_epoch": 2, "steps_per_epoch": 2, "seed": 3}
        assert (manifest.config["max_epoch"], manifest.config["steps_per_epoch"], manifest.config["seed"]) == (2, 2, 3)
        study = optuna.load_study(study_name=f"default-{stage}", storage=JournalStorage(
            JournalFileBackend(str(storage / "default" / stage / "optuna.journal"))))
        [trial] = study.trials
        assert trial.user_attrs["tune_trial_id"] == manifest.trial_id
        assert trial.user_attrs["outcome"] == "completed"
        assert trial.user_attrs["checkpoint"] == manifest.checkpoint
    listed = run(["--list", "--storage", str(storage)], str(tmp_path), timeout=120)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    pretrain = read_manifest(storage / "default" / "pretrain" / "best.json")
    assert any(line.startswith(f"  pretrain   finished    1 trial(s)  best synth_cfp_fp_acc="
                               f"{pretrain.metric_value:.4f} (trial {pretrain.trial_id})  test: ") for line in lines)
    generator = read_manifest(storage / "default" / "generator" / "best.json")
    assert any(line.startswith(f"  generator  finished    1 trial(s)  best {generator.metric_name}=") for line in lines), \
        listed.stdout
    print(done.stdout)
    print(listed.stdout)


def test_a_stopped_search_names_the_command_that_resumes_it(tmp_path, shared_ray):
    storage = tmp_path / "exp"
    args = ["--stage", "pretrain", "--budget", "smoke", "--storage", str(storage), "--max_epoch", "3",
            "--synthetic", "images_per_labeled_id=40", "--num-samples", "2"]
    driver = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=str(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    # Stopped after the first trial's first epoch was reported, the second trial still to come
    # (as test_search_faults does; a stop of the stage's last trial is not yet told apart from
    # its end: reported to the runner's owners).
    while not any(p.stat().st_size for p in (storage / "default" / "search_pretrain").glob("*/result.json")):
        assert time.time() < deadline and driver.poll() is None, driver.communicate()
        time.sleep(0.5)
    os.kill(driver.pid, signal.SIGTERM)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 130, out[-2000:] + err[-2000:]
    command = " ".join(["python", SCRIPT, *args, "--resume"])
    assert f"stopping: the search's state is being saved; continue it with `{command}`" in err
    assert f"continue it with `{command}`" in err.splitlines()[-1]
    listed = run(["--list", "--storage", str(storage)], str(tmp_path), timeout=120)
    # The exact command, as the driver recorded it.
    assert f"  pretrain   interrupted continue: {command}" in listed.stdout
    resumed = run([*args, "--resume"], str(tmp_path))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert read_manifest(storage / "default" / "pretrain" / "best.json").stage == "pretrain"
