"""From a TrainConfig to the data a stage needs: sources, pair sets, and the batch loader."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from virface.config import TrainConfig
from virface.data.images import resize_square
from virface.data.sampler import LabeledUnlabeledBatchSampler
from virface.data.files import FileListSource
from virface.data.recordio import RecordIOSource
from virface.data.sources import ImageSource
from virface.errors import ConfigError, CorruptImageError, DataError
from virface.evaluation.pairs import PairSet

DEFAULT_REAL_INPUT_SIZE = 112


@dataclass
class StageData:
    """What a stage reads. ``unlabeled`` is None for pretrain and generator. ``pair_sets``
    select (best epoch, best trial); ``test_pair_sets`` are only reported.

    ``labeled_split``: None, or an index n into ``labeled``: its images [0, n) and [n, N) are then
    batched like labeled and unlabeled data are, ``label_batch_size`` rows from the first part and
    ``unlabel_batch_size`` rows from the second in every batch (see
    :class:`LabeledUnlabeledBatchSampler`), with every row's label used. It is for the oracle
    that trains on the shallow identities WITH their true labels in VirFace's batch composition:
    deep images first, shallow ones second. Only for stages without unlabeled data.
    """

    labeled: ImageSource
    unlabeled: ImageSource | None
    pair_sets: dict[str, PairSet] = field(default_factory=dict)
    input_size: int = DEFAULT_REAL_INPUT_SIZE
    test_pair_sets: dict[str, PairSet] = field(default_factory=dict)
    labeled_split: int | None = None


def synthetic_cache_dir() -> str:
    return os.environ.get("VIRFACE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "virface"))


def count_labeled_identities(config: TrainConfig) -> int:
    """The number of identities in ``config``'s labeled data, reading nothing else."""
    if config.uses_synthetic:
        from virface.data.synthetic import SyntheticSpec, load_synthetic

        spec = SyntheticSpec.from_dict(config.synthetic, where="synthetic")
        return load_synthetic(spec, cache_dir=synthetic_cache_dir()).labeled.num_classes
    return open_image_source(config.labeled, config.labeled_root).num_classes


def build_stage_data(config: TrainConfig) -> StageData:
    """Open the labeled, unlabeled and verification data ``config`` names.

    No data options: the built-in synthetic faces (cached on disk, see ``VIRFACE_CACHE_DIR``).
    """
    from virface.evaluation.verification import open_pair_set

    pair_sets: dict[str, PairSet] = {}
    test_pair_sets: dict[str, PairSet] = {}
    if config.uses_synthetic:
        from virface.data.synthetic import SyntheticSpec, load_synthetic

        spec = SyntheticSpec.from_dict(config.synthetic, where="synthetic")
        faces = load_synthetic(spec, cache_dir=synthetic_cache_dir())
        input_size = config.input_size or spec.image_size
        labeled, unlabeled = faces.labeled, faces.unlabeled
        pair_sets.update(faces.pair_sets)
        test_pair_sets.update(faces.test_pair_sets)
    else:
        input_size = config.input_size or DEFAULT_REAL_INPUT_SIZE
        labeled = open_image_source(config.labeled, config.labeled_root)
        unlabeled = (open_image_source(config.unlabeled, config.unlabeled_root)
                     if config.unlabeled else None)
    for name, path in config.val.items():
        pair_sets[name] = open_pair_set(name, path, image_size=input_size)
    for name, path in config.test.items():
        test_pair_sets[name] = open_pair_set(name, path, image_size=input_size)
    for sets in (pair_sets, test_pair_sets):
        for name, ps in sets.items():
            if ps.images.shape[-1] != input_size:
                sets[name] = PairSet(name, resize_square(ps.images, input_size),
                                     ps.issame)
    if not config.uses_unlabeled:
        unlabeled = None
    elif unlabeled is None or len(unlabeled) == 0:
        raise DataError(f"method {config.method} needs unlabeled data, but "
                        f"{'--unlabeled was not given' if unlabeled is None else unlabeled.name + ' is empty'}")
    if config.num_ids is not None and config.num_ids != labeled.num_classes:
        raise ConfigError(f"num_ids: {config.num_ids} was given, but the labeled data "
                          f"{labeled.name} has {labeled.num_classes} identities")
    return StageData(labeled, unlabeled, pair_sets, input_size, test_pair_sets)


def open_image_source(path: str, root: str | None = None) -> ImageSource:
    """Open a data set from ``path``, choosing the format from what is there.

    - ``*.rec`` file, or a folder holding ``train.rec``: insightface RecordIO (``train.idx``
      beside it; read without mxnet).
    - a folder: one sub-folder per identity.
    - any other file: the reference's meta list, ``relative/path label`` per line, resolved
      against ``root`` (default: the list's own folder).
    """
    if not os.path.exists(path):
        raise DataError(f"data path does not exist: {path}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "train.rec")):
            return RecordIOSource(os.path.join(path, "train.rec"))
        if root is not None:
            raise DataError(f"{path}: a root folder is only used with a meta list, not a folder")
        return FileListSource.from_image_folder(path)
    if path.endswith(".rec"):
        return RecordIOSource(path)
    return FileListSource.from_meta_list(path, root=root)


def read_images(source: ImageSource, indices, input_size: int) -> torch.Tensor:
    """uint8 (len(indices), 3, S, S): the source's images at ``indices``, resized to S =
    ``input_size`` where they differ (a corrupt image raises, naming it)."""
    images = []
    for i in np.asarray(indices, dtype=np.int64).tolist():
        image = source.read(i)
        if image.shape[-1] != input_size or image.shape[-2] != input_size:
            image = resize_square(image, input_size)
        images.append(image)
    return torch.stack(images) if images else torch.empty((0, 3, input_size, input_size), dtype=torch.uint8)


def _check_labeled_split(data: StageData, unlabeled: ImageSource | None, config: TrainConfig) -> int:
    """``data.labeled_split`` if usable; raises ConfigError naming what is wrong otherwise."""
    n_first, n = data.labeled_split, len(data.labeled)
    if isinstance(n_first, bool) or not isinstance(n_first, int) or not 0 < n_first < n:
        raise ConfigError(f"labeled_split: {n_first!r} must be an integer in [1, {n - 1}] "
                          f"({data.labeled.name} has {n} images)")
    if unlabeled is not None:
        raise ConfigError("labeled_split: the second labeled part takes the unlabeled rows of each "
                          f"batch, so it cannot be combined with unlabeled data (method {config.method})")
    if config.unlabel_batch_size <= 0:
        raise ConfigError("labeled_split: unlabel_batch_size must be > 0 (the second part's rows "
                          "per batch)")
    return n_first


class LabeledUnlabeledDataset(Dataset):
    """Index i < len(labeled) reads labeled image i; larger indices read the unlabeled set.

    Items are (uint8 (3, S, S) image, label or -1, number of corrupt images skipped to get it).
    A corrupt image is replaced by the next readable one of the same source and counted, so a
    batch keeps its composition; ``strict`` raises instead.
    """

    def __init__(self, labeled: ImageSource, unlabeled: ImageSource | None, input_size: int,
                 strict: bool = False):
        self.labeled, self.unlabeled = labeled, unlabeled
        self.input_size, self.strict = input_size, strict

    def __len__(self) -> int:
        return len(self.labeled) + (len(self.unlabeled) if self.unlabeled is not None else 0)

    def _read(self, source: ImageSource, index: int, same_identity: bool) -> tuple[torch.Tensor, int, int]:
        """(image, index it came from, corrupt images skipped). A corrupt image is replaced by
        the next readable image of the same identity (``same_identity``; its label stays
        true), else of any identity (the caller takes that image's own label)."""
        n = len(source)
        candidates = range(index, index + n)
        if same_identity:
            own = np.flatnonzero(source.labels == source.labels[index])
            start = int(np.searchsorted(own, index))
            others = (j for j in range(index, index + n) if source.labels[j % n] != source.labels[index])
            candidates = itertools.chain(np.roll(own, -start).tolist(), others)
        skipped = 0
        for j in candidates:
            j %= n
            try:
                image = source.read(j)
            except CorruptImageError:
                if self.strict:
                    raise
                skipped += 1
                continue
            if image.shape[-1] != self.input_size or image.shape[-2] != self.input_size:
                image = resize_square(image, self.input_size)
            return image, j, skipped
        raise DataError(f"{source.name}: no image could be decoded")

    def __getitem__(self, index: int):
        n_l = len(self.labeled)
        if index < n_l:
            image, j, skipped = self._read(self.labeled, index, same_identity=True)
            return image, int(self.labeled.labels[j]), skipped
        image, _, skipped = self._read(self.unlabeled, index - n_l, same_identity=False)
        return image, -1, skipped

    def __getitems__(self, indices):
        # The sampler puts labeled indices first, then unlabeled ones; in-memory sources of the
        # right size are sliced with one fancy-index instead of a Python loop per image.
        n_l = len(self.labeled)
        items = []
        for source, idx, is_labeled in ((self.labeled, [i for i in indices if i < n_l], True),
                                        (self.unlabeled, [i - n_l for i in indices if i >= n_l], False)):
            if not idx:
                continue
            images = getattr(source, "images", None)
            if images is None or images.shape[1] != self.input_size or images.shape[2] != self.input_size:
                items += [self[i + (0 if is_labeled else n_l)] for i in idx]
                continue
            batch = torch.from_numpy(images[idx]).permute(0, 3, 1, 2)
            labels = source.labels[idx] if is_labeled else [-1] * len(idx)
            items += [(batch[k], int(labels[k]), 0) for k in range(len(idx))]
        return items


def collate_batch(items):
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    skipped = sum(it[2] for it in items)
    return images, labels, skipped


def make_train_loader(data: StageData, config: TrainConfig, rank: int = 0, world_size: int = 1,
                      with_unlabeled: bool | None = None) -> tuple[DataLoader, LabeledUnlabeledBatchSampler]:
    """The stage's loader; its batches are (uint8 (b, 3, S, S), labels (b,) with -1 for
    unlabeled rows, corrupt images skipped). Per rank: label_batch_size / world_size labeled
    rows first, then unlabel_batch_size / world_size unlabeled rows. With
    ``data.labeled_split`` the second part is the labeled images from that index on, with
    their labels."""
    with_unlabeled = data.unlabeled is not None if with_unlabeled is None else with_unlabeled
    unlabeled = data.unlabeled if with_unlabeled else None
    dataset = LabeledUnlabeledDataset(data.labeled, unlabeled, data.input_size, config.strict_data)
    if data.labeled_split is not None:
        n_first = _check_labeled_split(data, unlabeled, config)
        # The sampler's second part addresses indices n_first.. of the concatenation, which
        # are the labeled source's own second part: the dataset reads them as labeled.
        n_parts = (n_first, len(data.labeled) - n_first)
        batch_sizes = (config.label_batch_size, config.unlabel_batch_size)
    else:
        n_parts = (len(data.labeled), len(unlabeled) if unlabeled is not None else 0)
        batch_sizes = (config.label_batch_size, config.unlabel_batch_size if unlabeled is not None else 0)
    sampler = LabeledUnlabeledBatchSampler(
        *n_parts, *batch_sizes,
        rank=rank, world_size=world_size, seed=config.seed, steps_per_epoch=config.steps_per_epoch)
    # Decoding files is worth worker processes; slicing an in-memory array is not.
    in_memory = hasattr(data.labeled, "images") and (unlabeled is None or hasattr(unlabeled, "images"))
    workers = 0 if in_memory else config.loader_workers
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_batch,
                        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    return loader, sampler
