import numpy as np
import pytest
import torch

from virface.data.loading import StageData
from virface.data.sources import ArraySource
from virface.evaluation.pairs import PairSet


def random_stage_data(seed: int = 0, size: int = 16, n_ids: int = 6, per_id: int = 4,
                      n_unlabeled: int = 12, n_pairs: int = 20) -> StageData:
    """Random images: enough to exercise every code path of a stage in a second."""
    rng = np.random.default_rng(seed)
    labeled = ArraySource(rng.integers(0, 256, (n_ids * per_id, size, size, 3), dtype=np.uint8),
                          np.repeat(np.arange(100, 100 + n_ids), per_id), "tiny:labeled")
    unlabeled = ArraySource(rng.integers(0, 256, (n_unlabeled, size, size, 3), dtype=np.uint8),
                            np.arange(n_unlabeled), "tiny:unlabeled")
    pairs = PairSet("tiny_pairs", torch.from_numpy(rng.integers(0, 256, (2 * n_pairs, 3, size, size),
                                                                 dtype=np.uint8)),
                    np.tile([True, False], n_pairs // 2))
    return StageData(labeled, unlabeled, {"tiny_pairs": pairs}, size)


@pytest.fixture
def tiny_data() -> StageData:
    return random_stage_data()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Synthetic data caches go to a per-session folder, never the user's home.
    monkeypatch.setenv("VIRFACE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "virface-cache"))
