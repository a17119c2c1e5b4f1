"""The search driver under faults: a second driver, Ctrl-C and SIGTERM, a kill between the Optuna
journal's write and Tune's snapshot. Each ends in a search that completes on --resume with every
trial, the study and Tune agreeing, and nothing lost."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from virface.search.manifest import read_manifest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

SPACE = """\
scheduler: {type: none}
budget: {num_samples: 2, max_concurrent_trials: 1}
fixed: {arch: mobilefacenet_s, max_epoch: 2, label_batch_size: 8}
parameters:
  lr: {type: float, low: 0.01, high: 0.1, log: true, default: 0.05}
"""
# 16 ids x 20 images in batches of 8: 40 steps an epoch, long enough to interrupt mid-run.
DATA = ["--synthetic", "n_labeled_ids=16", "--synthetic", "images_per_labeled_id=20",
        "--synthetic", "n_unlabeled_ids=40", "--synthetic", "n_val_ids=16", "--synthetic", "val_pairs=100"]


@pytest.fixture
def search(tmp_path, shared_ray):
    # The drivers join the test process's shared Ray head (RAY_ADDRESS): a stop, a kill or a
    # full disk of the driver is what is tested, not Ray's start-up.
    (tmp_path / "space.yaml").write_text(SPACE)

    def command(*extra):
        return [sys.executable, os.path.join(REPO, "tune", "run_search.py"), "--stage", "pretrain",
                "--space", str(tmp_path / "space.yaml"), "--storage", str(tmp_path / "exp"), *DATA, *extra]
    return command


def start(command, env=None):
    """The driver, its output drained into ``process.lines`` (a full pipe would block it)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env=env)
    process.lines = []
    threading.Thread(target=lambda: process.lines.extend(process.stdout), daemon=True).start()
    return process


def wait_for(process, pattern, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in list(process.lines):
            if re.search(pattern, line):
                return line
        if process.poll() is not None and not any(re.search(pattern, x) for x in process.lines):
            time.sleep(0.5)
            if not any(re.search(pattern, x) for x in process.lines):
                raise AssertionError(f"the driver ended before printing {pattern}:\n"
                                     + "".join(process.lines[-20:]))
        time.sleep(0.2)
    raise AssertionError(f"no {pattern} in time:\n" + "".join(process.lines[-20:]))


def finish(process, timeout=120) -> str:
    process.wait(timeout=timeout)
    time.sleep(0.5)                 # the drain thread's last lines
    return "".join(process.lines)


def epochs_trained(storage) -> dict[str, list[int]]:
    """Per trial, the epochs it trained (each trained epoch writes its scalars to the trial's
    TensorBoard run; a report repeated after a restore does not), from the raw event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    trained = {}
    # The trials' runs are folders; the stage's HParams config files sit beside them.
    for run in sorted(r for r in (storage / "default" / "pretrain" / "tb").iterdir() if r.is_dir()):
        steps = [event.step for events in sorted(run.glob("events.out.tfevents.*"))
                 for event in EventFileLoader(str(events)).Load()
                 if any(v.tag == "train/epoch_time_s" for v in event.summary.value)]
        trained[run.name] = sorted(steps)
    return trained


def finished_search_agrees_with_the_study(storage):
    """Every trial finished once, in Tune and in the study; the manifest names the best one."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    manifest = read_manifest(storage / "default" / "pretrain" / "best.json")
    trials = json.loads((storage / "default" / "pretrain" / "trials.json").read_text())["trials"]
    study = optuna.load_study(study_name="default-pretrain", storage=JournalStorage(
        JournalFileBackend(str(storage / "default" / "pretrain" / "optuna.journal"))))
    states = [t.state.name for t in study.trials]
    assert len(trials) == 2 and states.count("COMPLETE") == 2 and "RUNNING" not in states, states
    assert max(t["metric"] for t in trials) == manifest.metric_value
    assert sorted(round(t.value, 6) for t in study.trials if t.state.name == "COMPLETE") == \
        sorted(round(t["metric"], 6) for t in trials)
    for path in (storage / "default" / "search_pretrain").glob("*/result.json"):
        epochs = [json.loads(x)["epoch"] for x in path.read_text().splitlines() if x.strip()]
        assert epochs.count(1) == 1, (path, epochs)              # no trial started over


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_search_exits_non_zero_writes_no_manifest_and_resumes(search, tmp_path, stop):
    driver = start(search())
    wait_for(driver, r"\| epoch 1/2:")
    os.kill(driver.pid, stop)
    output = finish(driver)
    assert driver.returncode == 130, output[-3000:]
    assert "interrupted" in output and "--resume" in output
    assert not (tmp_path / "exp" / "default" / "pretrain" / "best.json").exists()
    assert not (tmp_path / "exp" / "default" / "driver.lock").exists()
    resumed = subprocess.run(search("--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finished_search_agrees_with_the_study(tmp_path / "exp")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_as_the_stages_last_trial_starts_is_an_interrupt_and_resume_trains_that_trial(search, tmp_path, stop):
    # One trial: the stage's last trial is its only one. Tune marks a trial it stops TERMINATED,
    # with no epoch: that was taken for a finished stage ("stopped early", or "every trial failed").
    (tmp_path / "space.yaml").write_text(SPACE.replace("num_samples: 2", "num_samples: 1"))
    driver = start(search())
    wait_for(driver, r"trial 1/1 \w+ started")
    os.kill(driver.pid, stop)
    output = finish(driver)
    assert driver.returncode == 130, output[-3000:]
    assert "interrupted" in output and "--resume" in output and "failed" not in output, output[-3000:]
    assert not (tmp_path / "exp" / "default" / "pretrain" / "best.json").exists()
    resumed = subprocess.run(search("--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    [trial] = json.loads((tmp_path / "exp" / "default" / "pretrain" / "trials.json").read_text())["trials"]
    assert (trial["epochs"], trial["outcome"]) == (2, "completed"), trial
    assert read_manifest(tmp_path / "exp" / "default" / "pretrain" / "best.json").metric_value == trial["metric"]


def test_one_driver_per_experiment_and_a_dead_drivers_lock_is_taken_over(search, tmp_path):
    first = start(search())
    wait_for(first, r"started:")
    # Frozen, not ended, while the others try: still the lock's live holder, however long they take.
    os.killpg(first.pid, signal.SIGSTOP)
    for extra in ((), ("--resume",)):
        second = subprocess.run(search(*extra), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"being searched by another driver (pid {first.pid} on this machine" in second.stderr
    os.killpg(first.pid, signal.SIGKILL)                      # dies holding the lock
    first.wait()
    assert (tmp_path / "exp" / "default" / "driver.lock").exists()
    resumed = subprocess.run(search("--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finished_search_agrees_with_the_study(tmp_path / "exp")


KILL_AFTER_JOURNAL = """\
import os, signal, sys
if sys.argv and sys.argv[0].endswith("run_search.py"):
    from virface.search.searcher import StageOptunaSearch
    original = StageOptunaSearch.on_trial_complete

    def complete_then_die(self, trial_id, result=None, error=False):
        original(self, trial_id, result, error)        # the journal has the trial's end ...
        os.kill(os.getpid(), signal.SIGKILL)             # ... Tune's snapshot never will
    StageOptunaSearch.on_trial_complete = complete_then_die
"""


def test_a_kill_between_the_optuna_journal_and_tunes_snapshot_resumes(search, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AFTER_JOURNAL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), REPO])}
    killed = subprocess.run(search(), capture_output=True, text=True, timeout=600, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    journal = (tmp_path / "exp" / "default" / "pretrain" / "optuna.journal").read_text()
    assert '"state":1' in journal.replace(' ', '')   # the study recorded a COMPLETE trial Tune never saw end
    resumed = subprocess.run(search("--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finished_search_agrees_with_the_study(tmp_path / "exp")
    # The trial that finished just before the kill is not trained again, not even its last epoch.
    assert epochs_trained(tmp_path / "exp") == {name: [1, 2] for name in epochs_trained(tmp_path / "exp")}


DISK_FILLS_AFTER_THE_FIRST_TRIAL = """\
import errno, glob, json, os, sys
if sys.argv and sys.argv[0].endswith("run_search.py"):
    from optuna.storages.journal import JournalFileBackend
    from ray.tune.execution.tune_controller import TuneController
    from virface.search.searcher import StageOptunaSearch
    storage = sys.argv[sys.argv.index("--storage") + 1]
    full = []

    def no_space():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    complete, append, save = (StageOptunaSearch.on_trial_complete, JournalFileBackend.append_logs,
                              TuneController.save_to_dir)

    def complete_then_fill(self, trial_id, result=None, error=False):
        complete(self, trial_id, result, error)        # the first trial's end is in the journal
        if not full:
            full.append(True)
            # What the full disk did to Tune's last snapshot: its copy in storage is cut short.
            for path in glob.glob(os.path.join(storage, "default", "search_pretrain", "experiment_state-*.json")):
                text = open(path, "rb").read()
                open(path, "wb").write(text[:len(text) // 2])
            # ... and to the journal: the append in flight when the disk filled got half its
            # bytes out. Written here, not in the next append, because whether Tune's snapshot
            # or the next journal append comes first after a trial ends is a race (CI saw both).
            record = {"op_code": 4, "worker_id": "disk-filled", "trial_id": 1, "state": 1}
            data = (json.dumps(record, separators=(",", ":")) + "\\n").encode()
            with open(os.path.join(storage, "default", "pretrain", "optuna.journal"), "ab") as f:
                f.write(data[:len(data) // 2])

    def append_cut(self, logs):                        # the disk is full: nothing more gets out
        if not full:
            return append(self, logs)
        raise no_space()

    def save_fails(self):
        if full:
            raise no_space()
        return save(self)
    StageOptunaSearch.on_trial_complete = complete_then_fill
    JournalFileBackend.append_logs = append_cut
    TuneController.save_to_dir = save_fails
"""


def test_a_full_disk_stops_the_search_by_name_and_resume_continues_with_every_finished_trial(search, tmp_path):
    # Simulated, in the driver (sitecustomize): once the first trial has finished, every write
    # fails with ENOSPC as a full disk does; the Optuna journal's append is cut halfway and
    # Tune's experiment state in storage is left cut short, as the full disk left them.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DISK_FILLS_AFTER_THE_FIRST_TRIAL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), REPO])}
    full = subprocess.run(search(), capture_output=True, text=True, timeout=600, env=env)
    assert full.returncode == 2, full.stdout[-3000:] + full.stderr[-3000:]
    assert "could not be written" in full.stderr and "No space left on device" in full.stderr
    assert "continue with the same command and --resume" in full.stderr and "Traceback" not in full.stderr
    journal = tmp_path / "exp" / "default" / "pretrain" / "optuna.journal"
    assert not journal.read_bytes().endswith(b"\n")                 # its last record cut short
    resumed = subprocess.run(search("--resume"), capture_output=True, text=True, timeout=600)   # space freed
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "was cut short (a write that failed); put back its last complete version" in resumed.stdout
    assert "optuna.journal: dropped its last record, cut short by a write that failed" in resumed.stdout
    finished_search_agrees_with_the_study(tmp_path / "exp")
    assert epochs_trained(tmp_path / "exp") == {name: [1, 2] for name in epochs_trained(tmp_path / "exp")}


def test_a_space_edited_before_resuming_is_an_error_not_a_silent_mix(search, tmp_path):
    driver = start(search())
    wait_for(driver, r"\| epoch 1/2:")
    os.kill(driver.pid, signal.SIGINT)
    finish(driver)
    (tmp_path / "space.yaml").write_text(SPACE.replace("num_samples: 2", "num_samples: 5"))
    resumed = subprocess.run(search("--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2
    assert "the search space of stage pretrain changed since the search started (budget differ" in resumed.stderr
