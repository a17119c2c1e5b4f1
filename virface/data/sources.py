"""Image sources: an indexable set of (image, label) with one interface for every format.

Every source decodes to a uint8 RGB tensor of shape (3, H, W) and carries labels remapped to
0..C-1. The formats themselves live in their own modules (``recordio``, ``files``); this module
holds the interface and the in-memory source.
"""
from __future__ import annotations

import os
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from virface.errors import DataError


@runtime_checkable
class ImageSource(Protocol):
    """What the loaders need from a data set.

    ``labels`` is an int64 array of shape (N,) with values in [0, num_classes).
    ``read(i)`` returns a uint8 tensor (3, H, W), RGB, and raises ``CorruptImageError`` naming
    the file/record when the image cannot be decoded.
    """

    name: str
    labels: np.ndarray
    num_classes: int

    def __len__(self) -> int: ...

    def read(self, index: int) -> torch.Tensor: ...

    def describe(self, index: int) -> str: ...


def remap_labels(raw_labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary integer labels onto 0..C-1, keeping their sorted order.

    Returns ``(labels, classes)``: ``labels`` (N,) int64 in [0, C) and ``classes`` (C,) the raw
    label of each new index. The reference sized its head from a flag and indexed it with raw
    MS1M ids; deriving C from the data is what makes that bug impossible here.
    """
    raw = np.asarray(raw_labels, dtype=np.int64)
    classes, labels = np.unique(raw, return_inverse=True)
    return labels.astype(np.int64), classes


class ArraySource:
    """Images held in memory as one uint8 array (N, H, W, 3); used by the synthetic faces."""

    def __init__(self, images: np.ndarray, raw_labels: Sequence[int] | np.ndarray, name: str):
        images = np.ascontiguousarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(f"{name}: expected uint8 images of shape (N, H, W, 3), got "
                            f"{images.dtype} {images.shape}")
        if len(images) != len(raw_labels):
            raise DataError(f"{name}: {len(images)} images but {len(raw_labels)} labels")
        self.name = name
        self.images = images
        self.labels, self.classes = remap_labels(raw_labels)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index]).permute(2, 0, 1).contiguous()

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> "ArraySource":
        """A new source holding only ``indices`` (labels are remapped again)."""
        indices = np.asarray(indices, dtype=np.int64)
        return ArraySource(self.images[indices], self.classes[self.labels[indices]],
                           name or f"{self.name}[subset of {len(indices)}]")


def raw_class_ids(source: ImageSource) -> np.ndarray:
    """(N,) int64: each image's raw class id, ``source.classes[label]`` where the source has it."""
    labels = np.asarray(source.labels, dtype=np.int64)
    classes = getattr(source, "classes", None)
    return labels if classes is None else np.asarray(classes, dtype=np.int64)[labels]
