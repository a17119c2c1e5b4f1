"""A corrupt image is replaced by another image of the same identity, under its true label."""
import numpy as np
import pytest
import torch

from virface.data.loading import LabeledUnlabeledDataset
from virface.errors import CorruptImageError


class Faces:
    """Images whose pixels are their own index; the listed indices are corrupt."""

    def __init__(self, labels, corrupt):
        self.name, self.labels = "faces", np.asarray(labels)
        self.num_classes, self.corrupt = len(set(labels)), set(corrupt)

    def __len__(self):
        return len(self.labels)

    def read(self, i):
        if i in self.corrupt:
            raise CorruptImageError(f"faces[{i}]")
        return torch.full((3, 4, 4), i, dtype=torch.uint8)

    def describe(self, i):
        return f"faces[{i}]"


def read(labels, corrupt, index):
    image, label, skipped = LabeledUnlabeledDataset(Faces(labels, corrupt), None, 4)[index]
    return int(image[0, 0, 0]), label, skipped


def test_the_last_image_of_an_identity_is_replaced_by_one_of_the_same_identity():
    # Identity 0 is images 0-2, identity 1 images 3-4. Image 2 (the last of identity 0) is
    # corrupt: the next readable one of identity 0 wraps round to image 0, not image 3.
    assert read([0, 0, 0, 1, 1], {2}, 2) == (0, 0, 1)
    assert read([0, 0, 0, 1, 1], {1, 2}, 1) == (0, 0, 2)


def test_an_identity_with_no_readable_image_lends_the_next_identitys_image_and_label():
    assert read([0, 0, 1, 1], {0, 1}, 0) == (2, 1, 2)


def test_strict_data_raises_instead():
    dataset = LabeledUnlabeledDataset(Faces([0, 0], {1}), None, 4, strict=True)
    with pytest.raises(CorruptImageError, match=r"faces\[1\]"):
        dataset[1]
