"""StageData.labeled_split: a labeled source in two parts, batched like labeled + unlabeled data
(the oracle that trains on shallow identities with their true labels in VirFace's batches)."""
import numpy as np
import pytest

from virface import stages
from virface.checkpoint import load_checkpoint
from virface.config import TrainConfig
from virface.data.loading import StageData, make_train_loader
from virface.data.sources import ArraySource
from virface.errors import ConfigError


def two_part_data(n_deep=12, n_shallow=20, size=16, unlabeled=None) -> StageData:
    """Deep part: 3 identities x 4 images (raw ids 100-102); shallow part: 20 identities x 1
    image (raw ids 200-219). Pixel [0, 0, 0] of image i is i, so batches can be traced back."""
    images = np.zeros((n_deep + n_shallow, size, size, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n_deep + n_shallow)
    raw = np.concatenate([np.repeat([100, 101, 102], n_deep // 3), 200 + np.arange(n_shallow)])
    return StageData(ArraySource(images, raw, "deep+shallow"), unlabeled, {}, size,
                     labeled_split=n_deep)


def config(**kw) -> TrainConfig:
    base = dict(method="pretrain", label_batch_size=4, unlabel_batch_size=6, device="cpu",
                loader_workers=0, tensorboard=False, arch="mobilefacenet_s", feat_len=16)
    return TrainConfig(**{**base, **kw})


def test_each_batch_takes_label_batch_size_deep_rows_then_unlabel_batch_size_shallow_rows():
    data = two_part_data()
    loader, sampler = make_train_loader(data, config())
    batches = list(loader)
    # max(ceil(12 / 4), ceil(20 / 6)) = max(3, 4) steps, as for labeled + unlabeled data.
    assert len(batches) == len(sampler) == 4
    seen_shallow = []
    for images, labels, skipped in batches:
        index = images[:, 0, 0, 0].long().numpy()
        assert images.shape[0] == 10 and skipped == 0
        assert (index[:4] < 12).all() and (index[4:] >= 12).all()
        # Every row keeps its true label (no -1): deep ids 100-102 -> 0-2, shallow 200.. -> 3..
        expected = np.where(index < 12, index // 4, 3 + (index - 12))
        assert labels.tolist() == expected.tolist()
        seen_shallow += index[4:].tolist()
    assert sorted(seen_shallow[:20]) == list(range(12, 32))    # the shallow part is read once


def test_steps_per_epoch_caps_the_two_part_epoch():
    loader, sampler = make_train_loader(two_part_data(), config(steps_per_epoch=2))
    assert len(sampler) == 2 and len(list(loader)) == 2


def test_ranks_share_both_parts_evenly():
    data = two_part_data()
    cfg = config(label_batch_size=4, unlabel_batch_size=6)
    full = [imgs[:, 0, 0, 0].tolist() for imgs, _, _ in make_train_loader(data, cfg)[0]]
    ranks = [[imgs[:, 0, 0, 0].tolist() for imgs, _, _ in make_train_loader(data, cfg, rank=r, world_size=2)[0]]
             for r in (0, 1)]
    for g, a, b in zip(full, *ranks):
        assert a[:2] + b[:2] == g[:4] and a[2:] + b[2:] == g[4:]


@pytest.mark.parametrize("split, message", [(0, r"labeled_split: 0 must be an integer in \[1, 31\]"),
                                            (32, "labeled_split: 32 must be"),
                                            (2.5, "labeled_split: 2.5 must be")])
def test_a_split_outside_the_source_is_a_named_error(split, message):
    data = two_part_data()
    data.labeled_split = split
    with pytest.raises(ConfigError, match=message):
        make_train_loader(data, config())


def test_a_split_with_unlabeled_data_is_refused():
    unlabeled = ArraySource(np.zeros((5, 16, 16, 3), np.uint8), np.arange(5), "u")
    with pytest.raises(ConfigError, match="cannot be combined with unlabeled data"):
        make_train_loader(two_part_data(unlabeled=unlabeled), config(method="virclass"))


def test_a_split_needs_unlabeled_rows_per_batch():
    with pytest.raises(ConfigError, match="unlabel_batch_size must be > 0"):
        make_train_loader(two_part_data(), config(unlabel_batch_size=0))


def test_pretrain_stage_trains_on_both_parts_with_one_class_per_identity(tmp_path, monkeypatch):
    batches = []
    real = stages.make_train_loader

    class Recording:
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for batch in self.loader:
                batches.append(batch)
                yield batch

    def recording(*args, **kwargs):
        loader, sampler = real(*args, **kwargs)
        return Recording(loader), sampler

    monkeypatch.setattr(stages, "make_train_loader", recording)
    result = stages.run_stage(config(max_epoch=1, steps_per_epoch=3, eval=False), str(tmp_path / "run"),
                              data=two_part_data())
    assert result.history[-1]["steps"] == 3
    assert [len(labels) for _, labels, _ in batches] == [10, 10, 10]
    assert all((labels >= 0).all() for _, labels, _ in batches)
    assert load_checkpoint(result.last_checkpoint)["model"]["num_ids"] == 3 + 20
