"""Validation selects, test reports: best epochs, metrics and search choices read only --val sets;
--test sets are evaluated and reported as test_<name>_*."""
import json

import numpy as np
import pytest
import torch

import virface.stages
from virface.checkpoint import load_checkpoint
from virface.config import TrainConfig
from virface.data.loading import build_stage_data
from virface.errors import ConfigError
from virface.evaluation.pairs import PairSet
from virface.evaluation.verification import write_bin
from virface.metrics import PAIR_SET_METRICS
from virface.search.space import parse_search_space

TINY = dict(method="pretrain", arch="mobilefacenet_s", feat_len=16, label_batch_size=8,
            steps_per_epoch=1, max_epoch=3, device="cpu")


def test_the_best_epoch_is_chosen_on_validation_while_test_is_only_reported(tmp_path, tiny_data, monkeypatch):
    # Scripted scores that disagree: validation peaks at epoch 2, test at epoch 1.
    val_acc, test_acc = iter([0.6, 0.9, 0.7]), iter([0.95, 0.5, 0.6])

    def scripted(backbone, pair_sets, device, batch_size=256, prefix=""):
        if not pair_sets:
            return {}
        value = next(test_acc if prefix else val_acc)
        return {f"{prefix}{name}_{key}": (value if key == "acc" else 0.0)
                for name in pair_sets for key in PAIR_SET_METRICS}

    monkeypatch.setattr(virface.stages, "evaluate_pair_sets", scripted)
    data = tiny_data
    data.test_pair_sets = {"held_out": data.pair_sets["tiny_pairs"]}
    result = virface.stages.run_stage(TrainConfig(**TINY), str(tmp_path / "run"), data=data,
                                      tb_dir=str(tmp_path / "tb"))
    assert result.best == {"metric": "tiny_pairs_acc", "mode": "max", "value": 0.9, "epoch": 2, "rule": "best"}
    best = load_checkpoint(result.best_checkpoint)
    assert best["epoch"] == 2 and best["metrics"]["test_held_out_acc"] == 0.5
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["test_held_out_acc"] for x in lines] == [0.95, 0.5, 0.6]
    assert all("best_test_held_out_acc" not in x for x in lines)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "test/held_out_acc" in acc.Tags()["scalars"] and "val/tiny_pairs_acc" in acc.Tags()["scalars"]
    # Each accuracy's standard error over pairs sits beside it.
    assert {"test/held_out_acc_se", "val/tiny_pairs_acc_se"} <= set(acc.Tags()["scalars"])


def test_a_test_metric_can_never_be_what_selects():
    with pytest.raises(ConfigError, match="best_metric: 'test_lfw_acc' is a test pair set's metric"):
        TrainConfig(best_metric="test_lfw_acc")
    with pytest.raises(ConfigError, match="a --val name may not start with 'test_'"):
        TrainConfig(val={"test_lfw": "/x.bin"})
    space = parse_search_space({"metric": {"name": "test_lfw_acc"}}, "space.yaml", "pretrain")
    with pytest.raises(ConfigError, match="is a --test pair set's metric; test pairs are reported, never selected on"):
        space.resolve_metric(["lfw"])


def test_test_pair_sets_are_read_from_the_test_option(tmp_path):
    from virface.data.synthetic import SyntheticSpec, build_synthetic

    faces = build_synthetic(SyntheticSpec(image_size=16, n_labeled_ids=4, images_per_labeled_id=2,
                                          n_unlabeled_ids=2, n_val_ids=20, val_pairs=40))
    rng = np.random.default_rng(0)
    other = PairSet("x", torch.from_numpy(rng.integers(0, 256, (40, 3, 16, 16), dtype=np.uint8)),
                    np.tile([True, False], 10))
    path = write_bin(other, str(tmp_path / "agedb.bin"))
    config = TrainConfig(method="pretrain", synthetic=dict(faces.spec.to_dict()), test={"agedb": path})
    data = build_stage_data(config)
    assert "agedb" in data.test_pair_sets and "agedb" not in data.pair_sets
    assert torch.equal(data.test_pair_sets["agedb"].images, other.images)
