"""The stage loop on tiny random data, on CPU: every stage, chaining, resume, bad input."""
import json
import os

import pytest
import torch

from virface.checkpoint import load_checkpoint
from virface.config import TrainConfig
from virface.errors import (CheckpointError, ConfigError, DataError, NonFiniteLossError, NonFiniteWeightsError,
                            StagePreconditionError, VirFaceError)
from virface.stages import run_stage
from virface.steps import StageStep

TINY = dict(arch="mobilefacenet_s", feat_len=16, label_batch_size=8, unlabel_batch_size=4,
            steps_per_epoch=2, max_epoch=2, lr=0.05, gen_num=2, tensorboard=False, device="cpu")


def run(tmp_path, tiny_data, method, name=None, **kw):
    config = TrainConfig(method=method, **{**TINY, **kw})
    return run_stage(config, str(tmp_path / (name or method)), data=tiny_data)


@pytest.fixture
def pretrained(tmp_path, tiny_data):
    return run(tmp_path, tiny_data, "pretrain").best_checkpoint


def test_pretrain_writes_one_checkpoint_per_epoch_best_and_metrics(tmp_path, tiny_data):
    result = run(tmp_path, tiny_data, "pretrain", tensorboard=True)
    run_dir = tmp_path / "pretrain"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch_001.pt", "epoch_002.pt"]
    assert len(result.history) == 2                                 # exactly max_epoch epochs
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    for key in ("loss", "loss_arcface", "tiny_pairs_acc", "tiny_pairs_acc_se", "tiny_pairs_acc_std",
                "tiny_pairs_tar_far1e-3", "lr", "samples_per_s"):
        assert key in lines[-1]
    assert os.listdir(run_dir / "tb")
    state = load_checkpoint(str(run_dir / "best.pt"))
    assert state["epoch"] == result.best["epoch"] and state["best"]["metric"] == "tiny_pairs_acc"
    assert state["model"] == {"arch": "mobilefacenet_s", "feat_len": 16, "input_size": 16, "num_ids": 6}
    assert state["generator"] is None and set(state["optimizers"]) == {"main"}


def test_generator_trains_only_the_generator(tmp_path, tiny_data, pretrained):
    result = run(tmp_path, tiny_data, "generator", pretrained_file=pretrained)
    before, after = load_checkpoint(pretrained), load_checkpoint(result.last_checkpoint)
    for part in ("backbone", "head"):
        for key, value in before[part].items():
            assert torch.equal(value, after[part][key]), f"{part}.{key} moved"
    assert after["generator"] is not None
    assert {"gen_mse", "gen_kl", "gen_loss"} <= set(result.history[-1])
    assert result.best["metric"] == "gen_loss"


@pytest.mark.parametrize("optim_mode", ["alternate", "joint"])
def test_virface_chain_from_generator_checkpoint(tmp_path, tiny_data, pretrained, optim_mode):
    gen = run(tmp_path, tiny_data, "generator", pretrained_file=pretrained).best_checkpoint
    result = run(tmp_path, tiny_data, "virface", name=f"vf-{optim_mode}", pretrained_file=gen,
                 optim_mode=optim_mode)
    last = result.history[-1]
    for key in ("loss_vc", "loss_vi", "gen_mse", "gen_kl", "virtual_classes"):
        assert key in last
    assert last["virtual_classes"] == 4                               # the unlabeled batch
    state = load_checkpoint(result.last_checkpoint)
    assert set(state["optimizers"]) == ({"main", "generator"} if optim_mode == "alternate" else {"main"})


def test_virclass_with_overlap_filter_logs_its_count(tmp_path, tiny_data, pretrained):
    result = run(tmp_path, tiny_data, "virclass", pretrained_file=pretrained, overlap_threshold=1e-6)
    # A threshold below every max-probability drops every unlabeled sample.
    assert result.history[-1]["overlap_dropped"] == 4 and result.history[-1]["virtual_classes"] == 0


def test_virface_needs_a_generator_and_says_so_before_reading_data(tmp_path, pretrained):
    config = TrainConfig(method="virface", pretrained_file=pretrained, **TINY)
    with pytest.raises(StagePreconditionError, match="no generator.*generator stage first"):
        run_stage(config, str(tmp_path / "vf"), data=None)      # data=None: would read synthetic


def test_resume_continues_at_the_next_epoch(tmp_path, tiny_data):
    first = run(tmp_path, tiny_data, "pretrain", max_epoch=1)
    resumed = run_stage(TrainConfig(method="pretrain", resume_file=first.last_checkpoint, **{**TINY, "max_epoch": 3}),
                        str(tmp_path / "pretrain"), data=tiny_data)
    assert [m["epoch"] for m in resumed.history] == [2, 3]
    lines = (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    state = load_checkpoint(resumed.last_checkpoint)
    assert state["schedulers"]["main"]["last_epoch"] == 3


def test_resume_from_another_stage_is_refused(tmp_path, tiny_data, pretrained):
    with pytest.raises(CheckpointError, match="cannot resume stage virclass from a pretrain"):
        run(tmp_path, tiny_data, "virclass", resume_file=pretrained)


def test_existing_run_folder_is_not_overwritten(tmp_path, tiny_data):
    run(tmp_path, tiny_data, "pretrain", max_epoch=1)
    before = (tmp_path / "pretrain" / "metrics.jsonl").read_text()
    with pytest.raises(VirFaceError, match="already holds a run"):
        run(tmp_path, tiny_data, "pretrain", max_epoch=1)
    assert (tmp_path / "pretrain" / "metrics.jsonl").read_text() == before


def test_nan_loss_stops_with_stage_epoch_and_step_and_writes_no_checkpoint(tmp_path, tiny_data, monkeypatch):
    real_call = StageStep.__call__
    calls = {"n": 0}

    def poisoned(self, images, labels):
        terms = real_call(self, images, labels)
        calls["n"] += 1
        if calls["n"] == 2:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(StageStep, "__call__", poisoned)
    with pytest.raises(NonFiniteLossError, match="stage pretrain, epoch 1, step 2"):
        run(tmp_path, tiny_data, "pretrain")
    assert not os.listdir(tmp_path / "pretrain" / "checkpoints")
    assert not (tmp_path / "pretrain" / "best.pt").exists()


def test_weights_that_overflow_while_the_loss_stays_finite_are_caught_and_never_saved(tmp_path, tiny_data):
    # One step at lr 1e38: the loss of that step is finite, the weights after it are not.
    with pytest.raises(NonFiniteWeightsError, match=r"stage pretrain, epoch 1: \w+ \S+ holds inf or NaN"):
        run(tmp_path, tiny_data, "pretrain", lr=1e38, steps_per_epoch=1, max_epoch=1)
    assert not os.listdir(tmp_path / "pretrain" / "checkpoints")
    assert not (tmp_path / "pretrain" / "best.pt").exists()


def test_num_ids_that_disagree_with_the_data_name_both_numbers(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match="num_ids: 9.*has 6 identities"):
        run(tmp_path, tiny_data, "pretrain", num_ids=9)


def test_inherited_field_that_disagrees_with_the_checkpoint_is_an_error(tmp_path, tiny_data, pretrained):
    with pytest.raises(ConfigError, match="feat_len: 32 was given.*feat_len=16"):
        run(tmp_path, tiny_data, "virclass", pretrained_file=pretrained, feat_len=32)


def test_empty_unlabeled_set_is_an_error(tmp_path, tiny_data, pretrained):
    import dataclasses
    with pytest.raises(DataError, match="needs unlabeled data"):
        config = TrainConfig(method="virclass", pretrained_file=pretrained, **TINY)
        run_stage(config, str(tmp_path / "vc"), data=dataclasses.replace(tiny_data, unlabeled=None))


def test_labels_are_remapped_so_raw_ids_beyond_num_classes_work(tiny_data):
    # The tiny labeled set uses raw ids 100..105; the reference indexed its head with raw ids.
    assert tiny_data.labeled.num_classes == 6
    assert tiny_data.labeled.labels.max() == 5


@pytest.mark.parametrize("rule", ["best", "last", "mean_last:3"])
def test_best_pt_and_best_metric_follow_the_selection_rule(tmp_path, tiny_data, rule):
    result = run(tmp_path, tiny_data, "pretrain", max_epoch=4, selection=rule)
    acc = [m["tiny_pairs_acc"] for m in result.history]
    if rule == "best":
        epoch = 1 + max(range(4), key=lambda i: (acc[i], -i))      # the earliest of the best
        so_far = [max(acc[:e]) for e in range(1, 5)]
    elif rule == "last":
        epoch, so_far = 4, acc
    else:
        epoch = 4
        so_far = [sum(acc[max(0, e - 3):e]) / len(acc[max(0, e - 3):e]) for e in range(1, 5)]
    assert [m["best_tiny_pairs_acc"] for m in result.history] == pytest.approx(so_far)
    state = load_checkpoint(result.best_checkpoint)
    assert state["epoch"] == result.best["epoch"] == epoch
    assert state["best"]["rule"] == rule and state["best"]["value"] == pytest.approx(so_far[-1])
    saved = json.loads((tmp_path / "pretrain" / "config.json").read_text())
    assert saved["selection"] == rule


def test_a_resume_continues_the_rule_and_may_not_change_it(tmp_path, tiny_data):
    first = run(tmp_path, tiny_data, "pretrain", max_epoch=2, selection="mean_last:3")
    with pytest.raises(ConfigError, match="selection: 'best'.*selection='mean_last:3'"):
        run_stage(TrainConfig(method="pretrain", resume_file=first.last_checkpoint,
                              **{**TINY, "max_epoch": 3, "selection": "best"}),
                  str(tmp_path / "pretrain"), data=tiny_data)
    resumed = run_stage(TrainConfig(method="pretrain", resume_file=first.last_checkpoint,
                                    **{**TINY, "max_epoch": 3, "selection": "mean_last:3"}),
                        str(tmp_path / "pretrain"), data=tiny_data)
    acc = [m["tiny_pairs_acc"] for m in first.history + resumed.history]
    assert resumed.history[-1]["best_tiny_pairs_acc"] == pytest.approx(sum(acc) / 3)
