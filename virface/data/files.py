"""Images stored as separate files: a folder per identity, or the reference's meta list.

The meta list is the reference's format: one ``relative/path label`` per line, paths resolved
against a root folder (by default the list's own folder). :func:`write_image_folder` writes any
:class:`~virface.data.sources.ImageSource` back out in that layout.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from virface.fileio import read_two_field_lines, write_text_atomic
from virface.data.images import IMAGE_EXTENSIONS, png_bytes, read_image_file
from virface.data.sources import ImageSource, raw_class_ids, remap_labels
from virface.errors import DataError


class FileListSource:
    """An :class:`ImageSource` over image files given as ``(path, raw_label)`` pairs.

    ``labels`` (N,) int64 in [0, C); ``classes`` (C,) the raw label of each class index.
    """

    def __init__(self, items: Sequence[tuple[str, int]], name: str, check_files: bool = True):
        if len(items) == 0:
            raise DataError(f"{name}: no images")
        self.name = name
        self.paths = [str(p) for p, _ in items]
        self.labels, self.classes = remap_labels([int(label) for _, label in items])
        self.num_classes = len(self.classes)
        self.class_names: list[str] | None = None
        if check_files:
            _raise_if_missing(self.paths, name)

    @classmethod
    def from_image_folder(cls, root: str, name: str | None = None) -> "FileListSource":
        """One sub-folder per identity; identities are labelled by their sorted folder names.

        ``class_names[c]`` is the folder of class ``c`` (after remapping, empty folders drop out).
        """
        if not os.path.isdir(root):
            raise DataError(f"image folder does not exist: {root}")
        folders = sorted(d for d in os.listdir(root)
                         if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
        items = []
        for folder_index, folder in enumerate(folders):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
                dirnames.sort()  # os.walk order is filesystem order; sort for reproducibility
                for filename in sorted(filenames):
                    if filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith("."):
                        items.append((os.path.join(dirpath, filename), folder_index))
        if not items:
            raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in any identity "
                            f"sub-folder ({len(folders)} sub-folders found)")
        source = cls(items, name or os.path.basename(os.path.normpath(root)), check_files=False)
        source.class_names = [folders[i] for i in source.classes]
        return source

    @classmethod
    def from_meta_list(cls, list_path: str, root: str | None = None,
                       name: str | None = None) -> "FileListSource":
        """The reference's list: ``relative/path label`` per line; blank lines are ignored.

        Paths are resolved against ``root`` (default: the list file's folder). The label is the
        last whitespace-separated field, so paths may contain spaces.
        """
        if not os.path.isfile(list_path):
            raise DataError(f"meta list does not exist: {list_path}")
        if root is None:
            root = os.path.dirname(os.path.abspath(list_path))
        items = [(os.path.join(root, relative), label) for _, relative, label
                 in read_two_field_lines(list_path, 1, "relative/path label", DataError)]
        if not items:
            raise DataError(f"{list_path}: the meta list has no entries")
        return cls(items, name or os.path.basename(list_path))

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> torch.Tensor:
        """uint8 (3, H, W) RGB."""
        return read_image_file(self.paths[index])

    def describe(self, index: int) -> str:
        return self.paths[index]


def _raise_if_missing(paths: Sequence[str], name: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        first = "\n  ".join(missing[:5])
        raise DataError(f"{name}: {len(missing)} of {len(paths)} image files are missing; "
                        f"the first {min(5, len(missing))}:\n  {first}")


def write_image_folder(source: ImageSource, out_dir: str, meta_list_name: str = "meta.txt") -> str:
    """Write every image as ``out_dir/<class_id>/<index>.png`` plus a meta list.

    The meta list (``out_dir/meta_list_name``) holds ``<class_id>/<index>.png <class_id>`` lines,
    where class_id is the source's raw class id. Returns the meta list's path.
    """
    os.makedirs(out_dir, exist_ok=True)
    class_ids = raw_class_ids(source)
    lines = []
    for index in range(len(source)):
        class_id = int(class_ids[index])
        relative = f"{class_id}/{index}.png"
        os.makedirs(os.path.join(out_dir, str(class_id)), exist_ok=True)
        with open(os.path.join(out_dir, relative), "wb") as f:
            f.write(png_bytes(source.read(index)))
        lines.append(f"{relative} {class_id}\n")
    meta_path = os.path.join(out_dir, meta_list_name)
    write_text_atomic(meta_path, "".join(lines))
    return meta_path
