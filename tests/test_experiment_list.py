"""virface-search --list: the experiments under a storage folder, their stages and status, read
from the files a search leaves (no Ray)."""
import json
import os
import socket

from virface.search.cli import main
from virface.search.manifest import StageManifest, manifest_path, write_manifest
from virface.search.report import TrialRow, write_trials


def finish(storage, name, stage, value, test=None, overrides=None, trials=3):
    checkpoint = storage / name / "ckpt" / f"{stage}.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"weights")
    write_manifest(StageManifest(stage=stage, experiment=name, trial_id=f"{stage[:3]}01", config={},
                                 metric_name="synth_cfp_fp_acc", metric_value=value, metric_mode="max",
                                 checkpoint=str(checkpoint), test_metrics=test or {},
                                 overrides=overrides or {}),
                   manifest_path(storage, name, stage))
    write_trials(str(storage / name / stage / "trials.json"), stage, "synth_cfp_fp_acc", "max", 2,
                 [TrialRow(f"t{i}", {}, 0.5, 2, "completed") for i in range(trials)])


def hold_lock(folder, pid, host=None, process_start=None):
    folder.mkdir(parents=True, exist_ok=True)
    from virface.search.lock import _process_start

    (folder / "driver.lock").write_text(json.dumps({
        "host": host or socket.gethostname(), "pid": pid,
        "process_start": _process_start(pid) if process_start is None else process_start,
        "since": "2026-12-03T09:00:00+00:00"}))


def test_the_list_shows_each_experiments_stages_status_best_and_test_figures(tmp_path, capsys):
    storage = tmp_path / "exp"
    # "done": the whole chain finished, with the run size overridden.
    for stage, value in (("pretrain", 0.8625), ("generator", 0.1), ("virface", 0.9083)):
        finish(storage, "done", stage, value, test={"test_synth_cfp_fp_acc": 0.898, "test_synth_cfp_fp_acc_std": 0.01},
               overrides={"max_epoch": 2})
    # "stopped": pretrain finished, the generator's search interrupted (its driver is gone).
    finish(storage, "stopped", "pretrain", 0.85)
    (storage / "stopped" / "search_generator").mkdir()
    hold_lock(storage / "stopped", pid=999_999_999, process_start=1.0)      # no such process
    # "live": searched by a driver that still runs (this test's own process stands in for it).
    finish(storage, "live", "pretrain", 0.8)
    (storage / "live" / "search_virclass").mkdir()
    hold_lock(storage / "live", pid=os.getpid())
    (storage / "empty").mkdir()                      # no stage: not an experiment

    assert main(["--list", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"experiments under {storage}:"
    text = "\n".join(out)
    assert ("  virface    finished    3 trial(s)  best synth_cfp_fp_acc=0.9083 (trial vir01)  "
            "test: test_synth_cfp_fp_acc=0.8980  (max_epoch=2)") in out
    resume = f"virface-search --stage generator --name stopped --storage {storage} --resume"
    assert f"  generator  interrupted continue: {resume} (with the options it was started with)" in out
    assert "stopped  (running" not in text
    live = [line for line in out if line.startswith("live")]
    assert live == [f"live  (running: driver pid {os.getpid()} on this machine, since 2026-12-03T09:00:00+00:00)"]
    assert f"  virclass   running     driver pid {os.getpid()} on this machine" in text
    assert "empty" not in text
    # Experiments in name order, stages in chain order.
    assert [line for line in out if line and not line.startswith(" ")][1:] == [
        "done", live[0], "stopped"]


def test_a_storage_folder_that_does_not_exist_is_named(tmp_path, capsys):
    assert main(["--list", "--storage", str(tmp_path / "nowhere")]) == 2
    assert f"storage: {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_a_broken_manifest_is_listed_as_unreadable_with_the_reason(tmp_path, capsys):
    storage = tmp_path / "exp"
    (storage / "x" / "pretrain").mkdir(parents=True)
    (storage / "x" / "pretrain" / "best.json").write_text("{not json")
    assert main(["--list", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert f"  pretrain   unreadable  {storage / 'x' / 'pretrain' / 'best.json'}:1: invalid JSON" in out
