"""The labeled/unlabeled batch composer."""
import pytest

from virface.data.sampler import LabeledUnlabeledBatchSampler
from virface.errors import ConfigError


def test_every_batch_is_labeled_then_unlabeled_with_fixed_counts():
    s = LabeledUnlabeledBatchSampler(10, 30, label_batch_size=4, unlabel_batch_size=6)
    batches = list(s)
    assert len(batches) == len(s) == 5            # max(ceil(10/4), ceil(30/6))
    for b in batches:
        assert all(i < 10 for i in b[:4]) and all(10 <= i < 40 for i in b[4:])
        assert len(b) == 10


def test_smaller_source_is_reshuffled_when_exhausted():
    s = LabeledUnlabeledBatchSampler(4, 40, label_batch_size=2, unlabel_batch_size=4)
    labeled = [i for b in s for i in b[:2]]       # 10 steps x 2 = 20 labeled draws
    for start in range(0, 20, 4):                  # each pass of 4 is one permutation
        assert sorted(labeled[start:start + 4]) == [0, 1, 2, 3]
    unlabeled = [i for b in s for i in b[2:]]
    assert sorted(unlabeled) == list(range(4, 44))  # the larger source is read exactly once


def test_ranks_split_each_part_evenly_and_together_make_the_global_batch():
    full = list(LabeledUnlabeledBatchSampler(16, 16, 4, 4, seed=3))
    r0 = list(LabeledUnlabeledBatchSampler(16, 16, 4, 4, rank=0, world_size=2, seed=3))
    r1 = list(LabeledUnlabeledBatchSampler(16, 16, 4, 4, rank=1, world_size=2, seed=3))
    for g, a, b in zip(full, r0, r1):
        assert a[:2] + b[:2] == g[:4]              # labeled part
        assert a[2:] + b[2:] == g[4:]              # unlabeled part
        assert all(i < 16 for i in a[:2] + b[:2]) and all(i >= 16 for i in a[2:] + b[2:])


def test_epochs_differ_and_repeat_by_seed():
    s = LabeledUnlabeledBatchSampler(20, 0, 5, 0, seed=1)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(2)
    assert list(s) != e1
    s.set_epoch(1)
    assert list(s) == e1


def test_steps_per_epoch_caps_the_epoch():
    assert len(LabeledUnlabeledBatchSampler(100, 0, 5, 0, steps_per_epoch=3)) == 3


def test_batch_that_does_not_divide_over_ranks_is_an_error():
    with pytest.raises(ConfigError, match="label_batch_size=5.*2 ranks"):
        LabeledUnlabeledBatchSampler(10, 10, 5, 4, world_size=2)


def test_empty_unlabeled_set_is_an_error_when_batches_need_it():
    with pytest.raises(ConfigError, match="unlabeled set is empty"):
        LabeledUnlabeledBatchSampler(10, 0, 4, 4)
