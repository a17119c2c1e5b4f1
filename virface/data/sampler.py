"""The labeled/unlabeled batch composer."""
from __future__ import annotations

import math

import numpy as np

from virface.errors import ConfigError


class LabeledUnlabeledBatchSampler:
    """Yields each rank's share of global batches of ``label_batch_size`` labeled indices
    followed by ``unlabel_batch_size`` unlabeled ones.

    Indices address a concatenation [labeled (0..n_labeled-1); unlabeled (n_labeled..)].

    - Each source is read as a stream of permutations: when it is exhausted it is reshuffled and
      the stream continues, so every batch is full and the smaller source is resampled.
    - An epoch is ``max(ceil(n_labeled / label_batch_size), ceil(n_unlabeled / unlabel_batch_size))``
      steps (the reference's definition), optionally capped by ``steps_per_epoch``.
    - Sharding: rank r takes the r-th equal slice of the labeled part and of the unlabeled part,
      so every rank's batch has the same composition and BatchNorm sees both sources on every
      rank (the reference's DataParallel split put them on different GPUs).
    - Deterministic in (seed, epoch): every rank computes the same global batch.
    """

    def __init__(self, n_labeled: int, n_unlabeled: int, label_batch_size: int,
                 unlabel_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 steps_per_epoch: int | None = None):
        if n_labeled <= 0:
            raise ConfigError("the labeled set is empty")
        if unlabel_batch_size and n_unlabeled <= 0:
            raise ConfigError("unlabel_batch_size > 0 but the unlabeled set is empty")
        for name, size in (("label_batch_size", label_batch_size),
                           ("unlabel_batch_size", unlabel_batch_size)):
            if size % world_size:
                raise ConfigError(f"{name}={size} is a global batch size and must divide evenly "
                                  f"over {world_size} ranks")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        self.n_labeled, self.n_unlabeled = n_labeled, n_unlabeled
        self.label_batch_size, self.unlabel_batch_size = label_batch_size, unlabel_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        steps = math.ceil(self.n_labeled / self.label_batch_size)
        if self.unlabel_batch_size:
            steps = max(steps, math.ceil(self.n_unlabeled / self.unlabel_batch_size))
        return min(steps, self.steps_per_epoch) if self.steps_per_epoch else steps

    def _stream(self, n: int, batch: int, source: int) -> np.ndarray:
        """The first len(self) * batch indices of this epoch's permutation stream."""
        need = len(self) * batch
        rng = np.random.default_rng((self.seed, self.epoch, source))
        reps = math.ceil(need / n)
        return np.concatenate([rng.permutation(n) for _ in range(reps)])[:need]

    def __iter__(self):
        steps = len(self)
        labeled = self._stream(self.n_labeled, self.label_batch_size, 0).reshape(steps, -1)
        per_rank_l = self.label_batch_size // self.world_size
        labeled = labeled[:, self.rank * per_rank_l:(self.rank + 1) * per_rank_l]
        if self.unlabel_batch_size:
            unlabeled = self._stream(self.n_unlabeled, self.unlabel_batch_size, 1).reshape(steps, -1)
            per_rank_u = self.unlabel_batch_size // self.world_size
            unlabeled = unlabeled[:, self.rank * per_rank_u:(self.rank + 1) * per_rank_u] + self.n_labeled
            batches = np.concatenate([labeled, unlabeled], axis=1)
        else:
            batches = labeled
        for batch in batches:
            yield batch.tolist()
