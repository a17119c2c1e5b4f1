"""virface-train --resume_file: the checkpoint's settings, its own run folder, a best.pt rebuilt
from the resumed history, and a metrics.jsonl cut short by a crash."""
import json
import os

import pytest

import virface.stages
from virface.checkpoint import load_checkpoint
from virface.metrics import PAIR_SET_METRICS
from virface.train import main

TINY_SYNTHETIC = ["--synthetic", "n_labeled_ids=8", "--synthetic", "images_per_labeled_id=4",
                  "--synthetic", "n_unlabeled_ids=12", "--synthetic", "n_val_ids=20",
                  "--synthetic", "val_pairs=40", "--synthetic", "image_size=16"]
RUN = ["--method", "pretrain", "--arch", "mobilefacenet_s", "--feat_len", "16", "--steps_per_epoch", "1",
       "--device", "cpu", "--no-tensorboard", *TINY_SYNTHETIC]


@pytest.fixture
def scripted_accuracy(monkeypatch):
    """The selecting validation set's accuracy per evaluation, in the order given (the other
    sets, test sets included, score 0.5). The loop scores one pair set per call."""
    queue = []

    def scripted(backbone, pair_sets, device, batch_size=256, prefix=""):
        value = queue.pop(0) if "synth_cfp_fp" in pair_sets and not prefix else 0.5
        return {f"{prefix}{name}_{key}": (value if key == "acc" else 0.0)
                for name in pair_sets for key in PAIR_SET_METRICS}

    monkeypatch.setattr(virface.stages, "evaluate_pair_sets", scripted)
    return queue


def test_a_resumed_run_keeps_its_checkpoints_settings(tmp_path):
    run = str(tmp_path / "a")
    assert main([*RUN, "--snapshot_prefix", run, "--max_epoch", "2", "--s", "64", "--label_batch_size", "16"]) == 0
    os.unlink(f"{run}/checkpoints/epoch_002.pt")                    # as if killed during epoch 2
    assert main(["--method", "pretrain", "--resume_file", f"{run}/checkpoints/epoch_001.pt"]) == 0
    config = load_checkpoint(f"{run}/checkpoints/epoch_002.pt")["config"]
    assert (config["max_epoch"], config["s"], config["label_batch_size"]) == (2, 64.0, 16)


def test_a_resumed_run_may_train_longer_but_not_change_what_it_trained_with(tmp_path, capsys):
    run = str(tmp_path / "a")
    assert main([*RUN, "--snapshot_prefix", run, "--max_epoch", "1"]) == 0
    resume = ["--method", "pretrain", "--resume_file", f"{run}/checkpoints/epoch_001.pt"]
    assert main([*resume, "--s", "16"]) == 2
    assert "s: 16.0 was given, but the run in" in capsys.readouterr().err
    assert main([*resume, "--max_epoch", "2"]) == 0
    assert load_checkpoint(f"{run}/checkpoints/epoch_002.pt")["config"]["max_epoch"] == 2


def test_a_resume_writes_only_into_its_own_run_folder(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main([*RUN, "--snapshot_prefix", a, "--max_epoch", "1"]) == 0
    assert main([*RUN, "--snapshot_prefix", b, "--max_epoch", "1"]) == 0
    before = {name: open(os.path.join(b, name), "rb").read() for name in ("metrics.jsonl", "best.pt")}
    assert main(["--method", "pretrain", "--resume_file", f"{a}/checkpoints/epoch_001.pt",
                 "--snapshot_prefix", b, "--max_epoch", "2"]) == 2
    assert "is not the run folder of" in capsys.readouterr().err
    assert {name: open(os.path.join(b, name), "rb").read() for name in before} == before


def test_best_pt_is_rebuilt_from_the_resumed_history(tmp_path, scripted_accuracy):
    run = str(tmp_path / "a")
    scripted_accuracy += [0.7, 0.9, 0.8]                 # first run: best at epoch 2
    assert main([*RUN, "--snapshot_prefix", run, "--max_epoch", "3"]) == 0
    assert load_checkpoint(f"{run}/best.pt")["epoch"] == 2
    # Resumed after epoch 1, epochs 2 and 3 now score below epoch 1: epoch 1 is the best.
    scripted_accuracy += [0.6, 0.65]
    assert main(["--method", "pretrain", "--resume_file", f"{run}/checkpoints/epoch_001.pt"]) == 0
    best = load_checkpoint(f"{run}/best.pt")
    assert best["epoch"] == 1 and best["best"]["value"] == 0.7
    lines = [json.loads(x) for x in open(f"{run}/metrics.jsonl").read().splitlines()]
    assert [(x["epoch"], x["pretrain_acc"] if "pretrain_acc" in x else x["synth_cfp_fp_acc"])
            for x in lines] == [(1, 0.7), (2, 0.6), (3, 0.65)]


def test_a_metrics_line_cut_short_by_a_crash_does_not_stop_a_resume(tmp_path):
    run = str(tmp_path / "a")
    assert main([*RUN, "--snapshot_prefix", run, "--max_epoch", "2"]) == 0
    with open(f"{run}/metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "loss": 1.2')                     # no newline: the crash
    os.unlink(f"{run}/checkpoints/epoch_002.pt")
    assert main(["--method", "pretrain", "--resume_file", f"{run}/checkpoints/epoch_001.pt"]) == 0
    epochs = [json.loads(x)["epoch"] for x in open(f"{run}/metrics.jsonl").read().splitlines()]
    assert epochs == [1, 2]


def test_a_resumed_run_trains_exactly_as_the_uninterrupted_one(tmp_path, tiny_data):
    import torch

    from virface.config import TrainConfig
    from virface.stages import run_stage

    tiny = dict(method="virface", arch="mobilefacenet_s", feat_len=16, label_batch_size=8,
                unlabel_batch_size=4, steps_per_epoch=2, gen_num=2, tensorboard=False, device="cpu")
    pre = run_stage(TrainConfig(method="pretrain", arch="mobilefacenet_s", feat_len=16, label_batch_size=8,
                                steps_per_epoch=1, max_epoch=1, tensorboard=False, device="cpu"),
                    str(tmp_path / "pre"), data=tiny_data)
    gen = run_stage(TrainConfig(**{**tiny, "method": "generator"}, max_epoch=1, pretrained_file=pre.best_checkpoint),
                    str(tmp_path / "gen"), data=tiny_data)
    whole = run_stage(TrainConfig(**tiny, max_epoch=2, pretrained_file=gen.best_checkpoint),
                      str(tmp_path / "whole"), data=tiny_data)
    first = run_stage(TrainConfig(**tiny, max_epoch=2, pretrained_file=gen.best_checkpoint),
                      str(tmp_path / "cut"), data=tiny_data)
    os.unlink(tmp_path / "cut" / "checkpoints" / "epoch_002.pt")            # killed in epoch 2
    run_stage(TrainConfig(**tiny, max_epoch=2, resume_file=str(tmp_path / "cut" / "checkpoints" / "epoch_001.pt")),
              str(tmp_path / "cut"), data=tiny_data)
    a = load_checkpoint(str(tmp_path / "whole" / "checkpoints" / "epoch_002.pt"))
    b = load_checkpoint(str(tmp_path / "cut" / "checkpoints" / "epoch_002.pt"))
    for part in ("backbone", "head", "generator"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert first.history[0]["loss"] == whole.history[0]["loss"]


def folder_bytes(folder) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def test_a_copied_run_folder_resumes_into_the_copy_and_never_touches_the_original(tmp_path):
    import shutil

    run, copy = str(tmp_path / "run"), str(tmp_path / "copy")
    assert main([*RUN, "--snapshot_prefix", run, "--max_epoch", "2"]) == 0
    shutil.copytree(run, copy)                                        # cp -a run copy
    original = folder_bytes(run)
    assert main(["--method", "pretrain", "--resume_file", f"{copy}/checkpoints/epoch_001.pt",
                 "--max_epoch", "3"]) == 0
    assert folder_bytes(run) == original                              # not one byte changed
    assert load_checkpoint(f"{copy}/checkpoints/epoch_003.pt")["run_dir"] == copy
    epochs = [json.loads(x)["epoch"] for x in open(f"{copy}/metrics.jsonl").read().splitlines()]
    assert epochs == [1, 2, 3]


def test_a_moved_run_folder_resumes_where_it_is_and_the_old_place_is_not_recreated(tmp_path):
    run, moved = str(tmp_path / "run"), str(tmp_path / "moved")
    assert main([*RUN, "--snapshot_prefix", run, "--max_epoch", "1"]) == 0
    os.rename(run, moved)
    assert main(["--method", "pretrain", "--resume_file", f"{moved}/best.pt", "--max_epoch", "2"]) == 0
    assert not os.path.exists(run)
    assert sorted(os.listdir(f"{moved}/checkpoints")) == ["epoch_001.pt", "epoch_002.pt"]


def test_a_checkpoint_outside_a_run_folder_resumes_only_into_a_folder_named_for_it(tmp_path, capsys):
    import shutil

    run = str(tmp_path / "run")
    assert main([*RUN, "--snapshot_prefix", run, "--max_epoch", "1"]) == 0
    shutil.copy(f"{run}/checkpoints/epoch_001.pt", tmp_path / "loose.pt")
    original = folder_bytes(run)
    resume = ["--method", "pretrain", "--resume_file", str(tmp_path / "loose.pt"), "--max_epoch", "2"]
    assert main(resume) == 2
    assert f"resume_file: {tmp_path / 'loose.pt'} is not in a run folder" in capsys.readouterr().err
    assert main([*resume, "--snapshot_prefix", run]) == 2            # a folder holding a run
    assert "holds another run than" in capsys.readouterr().err
    assert main([*resume, "--snapshot_prefix", str(tmp_path / "new")]) == 0
    assert folder_bytes(run) == original
    assert os.path.isfile(tmp_path / "new" / "checkpoints" / "epoch_002.pt")


def test_config_json_records_the_settings_the_resumed_run_trains_with(tmp_path):
    run = str(tmp_path / "run")
    assert main([*RUN, "--snapshot_prefix", run, "--max_epoch", "1"]) == 0
    assert json.load(open(f"{run}/config.json"))["sample_rate"] in (None, 1.0)
    assert main(["--method", "pretrain", "--resume_file", f"{run}/checkpoints/epoch_001.pt",
                 "--max_epoch", "2", "--sample_rate", "0.5"]) == 0
    config = json.load(open(f"{run}/config.json"))
    assert (config["sample_rate"], config["max_epoch"]) == (0.5, 2)
    assert load_checkpoint(f"{run}/checkpoints/epoch_002.pt")["config"]["sample_rate"] == 0.5


def test_a_full_disk_after_an_epochs_checkpoint_loses_no_metrics_line(tmp_path, scripted_accuracy,
                                                                        monkeypatch, capsys):
    import errno
    import shutil

    run = str(tmp_path / "run")
    scripted_accuracy += [0.7, 0.9, 0.8]           # epoch 2 is the best: best.pt is copied then
    real_copy, copies = shutil.copyfileobj, []

    def disk_full_at_the_second_best_copy(src, dst, *args, **kwargs):
        copies.append(dst.name)
        if len(copies) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy(src, dst, *args, **kwargs)
    # Simulated: the disk fills while epoch 2's best.pt is copied, after its checkpoint was saved.
    monkeypatch.setattr(shutil, "copyfileobj", disk_full_at_the_second_best_copy)
    assert main([*RUN, "--snapshot_prefix", run, "--max_epoch", "3"]) == 2
    assert "best.pt: cannot write (No space left on device)" in capsys.readouterr().err
    epoch_2 = load_checkpoint(f"{run}/checkpoints/epoch_002.pt")["metrics"]
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)            # space freed
    assert main(["--method", "pretrain", "--resume_file", f"{run}/checkpoints/epoch_002.pt"]) == 0
    lines = [json.loads(x) for x in open(f"{run}/metrics.jsonl").read().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert lines[1] == epoch_2
    assert [x["synth_cfp_fp_acc"] for x in lines] == [0.7, 0.9, 0.8]
    assert load_checkpoint(f"{run}/best.pt")["epoch"] == 2
