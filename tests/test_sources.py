"""In-memory image sources: any integer labels become classes 0..C-1 in sorted order (the head is
sized from the data, never from a flag), bad arrays are refused by name, and a subset keeps each
image's raw identity."""
from types import SimpleNamespace

import numpy as np
import pytest

from virface.data.sources import ArraySource, raw_class_ids, remap_labels
from virface.errors import DataError


def images(n, size=4, channels=3, dtype=np.uint8):
    return np.arange(n * size * size * channels, dtype=np.int64).reshape(n, size, size, channels).astype(dtype)


def test_odd_labels_become_classes_in_sorted_order():
    labels, classes = remap_labels([70001, -3, 42, 70001, 42, 9])
    assert classes.tolist() == [-3, 9, 42, 70001]
    assert labels.tolist() == [3, 0, 2, 3, 2, 1]
    assert labels.dtype == np.int64 and classes.dtype == np.int64


def test_an_array_source_reads_channels_first_and_names_each_image():
    source = ArraySource(images(3), [5, 9, 5], "faces")
    assert (len(source), source.num_classes, source.labels.tolist()) == (3, 2, [0, 1, 0])
    first = source.read(1)
    assert tuple(first.shape) == (3, 4, 4)
    assert first[:, 0, 0].tolist() == images(3)[1, 0, 0].tolist()
    assert (source.name, source.describe(2)) == ("faces", "faces[2]")


@pytest.mark.parametrize("array, what", [
    (images(2, channels=1), "uint8 (2, 4, 4, 1)"),             # grey: only the channel count is wrong
    (images(2, dtype=np.float32), "float32 (2, 4, 4, 3)"),      # only the type is wrong
    (images(2)[..., 0], "uint8 (2, 4, 4)"),                      # only the rank is wrong
])
def test_an_array_of_another_layout_is_refused_naming_the_source_and_what_it_got(array, what):
    with pytest.raises(DataError) as error:
        ArraySource(array, [0, 1], "faces")
    assert str(error.value) == f"faces: expected uint8 images of shape (N, H, W, 3), got {what}"


def test_images_and_labels_of_different_lengths_are_refused_by_name():
    with pytest.raises(DataError) as error:
        ArraySource(images(3), [0, 1], "faces")
    assert str(error.value) == "faces: 3 images but 2 labels"


def test_a_subset_keeps_each_images_raw_identity_and_says_what_it_is():
    source = ArraySource(images(5), [30, 10, 20, 10, 30], "faces")
    part = source.subset([4, 2, 0])
    assert np.array_equal(part.images, source.images[[4, 2, 0]])
    assert raw_class_ids(part).tolist() == [30, 20, 30]
    assert (part.num_classes, part.labels.tolist()) == (2, [1, 0, 1])
    assert part.name == "faces[subset of 3]"
    assert source.subset([1], name="one").name == "one"


def test_raw_class_ids_read_the_classes_where_a_source_has_them():
    assert raw_class_ids(ArraySource(images(3), [7, 3, 7], "faces")).tolist() == [7, 3, 7]
    plain = SimpleNamespace(labels=[2, 0, 1])                    # a source without ``classes``
    assert raw_class_ids(plain).tolist() == [2, 0, 1]
    assert raw_class_ids(plain).dtype == np.int64


def test_labels_of_a_narrow_integer_type_come_back_as_int64():
    # Labels read into uint8/int32 arrays (a small meta list) must not stay narrow: class ids
    # are offset and concatenated later (virtual classes after the labeled ones).
    labels, classes = remap_labels(np.array([200, 3, 200], dtype=np.uint8))
    assert (labels.dtype, classes.dtype) == (np.int64, np.int64)
    source = SimpleNamespace(labels=np.array([1, 0], dtype=np.uint8), classes=np.array([250, 7], dtype=np.uint8))
    ids = raw_class_ids(source)
    assert ids.dtype == np.int64 and ids.tolist() == [7, 250]
    assert raw_class_ids(SimpleNamespace(labels=np.array([1, 0], dtype=np.int32))).dtype == np.int64
