"""Checkpoints: atomic writes, strict loading, stage preconditions."""
import os

import pytest
import torch
import torch.nn as nn

from virface.checkpoint import (check_stage_preconditions, load_checkpoint, load_module_state,
                                save_checkpoint)
from virface.errors import CheckpointError, StagePreconditionError


def test_round_trip(tmp_path):
    path = save_checkpoint({"stage": "pretrain", "epoch": 3, "backbone": {"w": torch.ones(2)}},
                           str(tmp_path / "a.pt"))
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["backbone"]["w"], torch.ones(2))


def test_failed_write_leaves_neither_a_partial_file_nor_a_temporary(tmp_path, monkeypatch):
    target = tmp_path / "epoch_001.pt"
    save_checkpoint({"epoch": 1}, str(target))

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 2}, str(target))
    monkeypatch.undo()
    assert load_checkpoint(str(target))["epoch"] == 1          # the old file is intact
    assert os.listdir(tmp_path) == ["epoch_001.pt"]


def test_module_prefix_from_data_parallel_is_accepted():
    src, dst = nn.Linear(2, 3), nn.Linear(2, 3)
    wrapped = {"module." + k: v for k, v in src.state_dict().items()}
    load_module_state(dst, wrapped, "backbone", "x.pt")
    assert torch.equal(dst.weight, src.weight)


@pytest.mark.parametrize("state, message", [
    ({"weight": torch.zeros(3, 2)}, r"missing 1: \['bias'\]"),
    ({"weight": torch.zeros(3, 2), "bias": torch.zeros(3), "extra": torch.zeros(1)}, r"unexpected 1: \['extra'\]"),
    ({"weight": torch.zeros(4, 2), "bias": torch.zeros(3)}, r"weight: checkpoint \(4, 2\) vs model \(3, 2\)"),
])
def test_loading_fails_loudly_naming_the_keys(state, message):
    with pytest.raises(CheckpointError, match=message):
        load_module_state(nn.Linear(2, 3), state, "backbone", "x.pt")


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_stage_preconditions():
    pretrained = {"stage": "pretrain", "backbone": {}, "head": {}, "generator": None}
    check_stage_preconditions("pretrain", None, None)
    check_stage_preconditions("generator", pretrained, "p.pt")
    check_stage_preconditions("virclass", pretrained, "p.pt")
    with pytest.raises(StagePreconditionError, match="p.pt: stage virface needs.*no generator.*generator stage first"):
        check_stage_preconditions("virface", pretrained, "p.pt")
    with pytest.raises(StagePreconditionError, match="--pretrained_file"):
        check_stage_preconditions("generator", None, None)


def test_a_failed_write_leaves_no_temporary_file_and_the_old_file_intact(tmp_path, monkeypatch):
    import errno
    import shutil

    from virface.checkpoint import copy_checkpoint
    from virface.errors import WriteError

    source, target = tmp_path / "epoch_002.pt", tmp_path / "best.pt"
    source.write_bytes(b"new weights")
    target.write_bytes(b"old weights")

    def disk_full(src, dst, *args):
        dst.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", disk_full)
    with pytest.raises(WriteError, match=r"best.pt: cannot write \(No space left on device\); the file is as it was"):
        copy_checkpoint(str(source), str(target))
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "epoch_002.pt"]
    assert target.read_bytes() == b"old weights"


def test_files_written_atomically_get_the_mode_open_would_give_them(tmp_path):
    from virface.fileio import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "results.json", "{}\n")
        save_checkpoint({"x": torch.zeros(1)}, str(tmp_path / "w.pt"))
    finally:
        os.umask(old)
    for name in ("results.json", "w.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name   # not mkstemp's 0600
