import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import encode_png

from virface.data.files import FileListSource, write_image_folder
from virface.data.sources import ArraySource
from virface.errors import CorruptImageError, DataError


def save_png(path, value):
    """A 2x2 RGB image whose pixel (0, 0) is (value, 0, 255 - value)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = torch.zeros((3, 2, 2), dtype=torch.uint8)
    image[0, 0, 0], image[2, 0, 0] = value, 255 - value
    with open(path, "wb") as f:
        f.write(encode_png(image).numpy().tobytes())
    return image


def test_image_folder_labels_identities_by_sorted_folder_name(tmp_path):
    save_png(str(tmp_path / "bob" / "1.png"), 1)
    save_png(str(tmp_path / "alice" / "b.PNG"), 2)  # extensions are case-insensitive
    save_png(str(tmp_path / "alice" / "a.png"), 3)
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    source = FileListSource.from_image_folder(str(tmp_path))
    assert [os.path.relpath(source.describe(i), tmp_path) for i in range(len(source))] == \
        ["alice/a.png", "alice/b.PNG", "bob/1.png"]
    assert source.labels.tolist() == [0, 0, 1]
    assert source.num_classes == 2 and source.class_names == ["alice", "bob"]
    assert int(source.read(0)[0, 0, 0]) == 3


def test_image_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        FileListSource.from_image_folder(str(tmp_path))


def test_meta_list_resolves_paths_against_its_folder_and_ignores_blank_lines(tmp_path):
    save_png(str(tmp_path / "data" / "a b.png"), 7)  # a space in the path
    save_png(str(tmp_path / "data" / "c.png"), 8)
    meta = tmp_path / "list.txt"
    meta.write_text("data/a b.png 42\n\n   \ndata/c.png 5\n")
    source = FileListSource.from_meta_list(str(meta))
    assert source.classes.tolist() == [5, 42] and source.labels.tolist() == [1, 0]
    assert int(source.read(1)[0, 0, 0]) == 8


def test_meta_list_root_overrides_the_list_folder(tmp_path):
    save_png(str(tmp_path / "images" / "x.png"), 9)
    meta = tmp_path / "lists" / "meta.txt"
    meta.parent.mkdir()
    meta.write_text("x.png 1\n")
    source = FileListSource.from_meta_list(str(meta), root=str(tmp_path / "images"))
    assert source.describe(0) == str(tmp_path / "images" / "x.png")


def test_malformed_meta_list_line_names_file_line_and_text(tmp_path):
    meta = tmp_path / "list.txt"
    meta.write_text("a.png 1\n\nb.png one\n")
    with pytest.raises(DataError, match=r"list\.txt:3: .*'b\.png one'"):
        FileListSource.from_meta_list(str(meta))
    meta.write_text("lonely_path_without_label\n")
    with pytest.raises(DataError, match=r"list\.txt:1: "):
        FileListSource.from_meta_list(str(meta))


def test_missing_files_are_one_error_with_count_and_first_five(tmp_path):
    save_png(str(tmp_path / "present.png"), 1)
    lines = ["present.png 0"] + [f"gone{i}.png {i}" for i in range(7)]
    meta = tmp_path / "list.txt"
    meta.write_text("\n".join(lines))
    with pytest.raises(DataError) as info:
        FileListSource.from_meta_list(str(meta))
    message = str(info.value)
    assert "7 of 8 image files are missing" in message
    assert all(f"gone{i}.png" in message for i in range(5))
    assert "gone5.png" not in message and "gone6.png" not in message


def test_undecodable_file_raises_corrupt_image_naming_the_path(tmp_path):
    bad = tmp_path / "a" / "bad.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"definitely not a jpeg")
    source = FileListSource.from_image_folder(str(tmp_path))
    with pytest.raises(CorruptImageError, match=r"bad\.jpg"):
        source.read(0)


def test_bmp_images_decode_to_rgb(tmp_path):
    (tmp_path / "p").mkdir()
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[1, 2] = (10, 20, 30)
    Image.fromarray(pixels).save(tmp_path / "p" / "x.bmp")
    image = FileListSource.from_image_folder(str(tmp_path)).read(0)
    assert image.shape == (3, 2, 3) and image[:, 1, 2].tolist() == [10, 20, 30]


def test_write_image_folder_writes_class_folders_and_a_meta_list_of_raw_ids(tmp_path):
    images = np.zeros((3, 2, 2, 3), dtype=np.uint8)
    images[:, 0, 0, 1] = [5, 6, 7]
    source = ArraySource(images, [10, 3, 10], name="tiny")
    meta = write_image_folder(source, str(tmp_path / "out"))
    assert meta == str(tmp_path / "out" / "meta.txt")
    assert open(meta).read() == "10/0.png 10\n3/1.png 3\n10/2.png 10\n"
    back = FileListSource.from_meta_list(meta)
    assert back.classes.tolist() == [3, 10] and back.labels.tolist() == [1, 0, 1]
    assert [int(back.read(i)[1, 0, 0]) for i in range(3)] == [5, 6, 7]
