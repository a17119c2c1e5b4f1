"""A verification pair set: 2N images where images 2k and 2k+1 form pair k."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from virface.errors import PairSetError


@dataclass
class PairSet:
    """``images``: uint8 (2N, 3, H, W) RGB; ``issame``: bool (N,). Pair k is images[2k], images[2k+1].

    Pairs keep the order of their source file, so contiguous 10-fold splits are the official
    folds of LFW (10 x 600) and CFP (10 x 700).
    """

    name: str
    images: torch.Tensor
    issame: np.ndarray

    def __post_init__(self):
        self.issame = np.asarray(self.issame, dtype=bool)
        n_img = int(self.images.shape[0])
        if n_img % 2:
            raise PairSetError(f"{self.name}: odd number of images ({n_img}); pairs need 2 each")
        if n_img // 2 != len(self.issame):
            raise PairSetError(f"{self.name}: {n_img} images make {n_img // 2} pairs, but the "
                               f"issame list has {len(self.issame)} entries")
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise PairSetError(f"{self.name}: images must be uint8 (2N, 3, H, W), got "
                               f"{self.images.dtype} {tuple(self.images.shape)}")

    def __len__(self) -> int:
        return len(self.issame)
