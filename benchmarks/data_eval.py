"""Data and evaluation speed.

Prints
  - images/s decoded (and resized/flipped as for training) from an insightface ``.rec`` and from
    an image folder, with 1 and 2 loader worker processes;
  - seconds for the 10-fold verification of 6,000 pairs from extracted features (goal < 1 s).

    python benchmarks/data_eval.py            # 112 px JPEG-in-RecordIO and PNG folders, ~1 min
    python benchmarks/data_eval.py --quick    # smaller, for the tests
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_sources(root: str, n_images: int, size: int):
    """The same random-textured images written as a JPEG RecordIO and as a PNG image folder."""
    from virface.data.files import FileListSource, write_image_folder
    from virface.data.recordio import RecordIOSource, write_recordio_source
    from virface.data.sources import ArraySource

    rng = np.random.default_rng(0)
    # Smooth random images compress like photos rather than like noise.
    low = rng.integers(0, 256, (n_images, size // 8, size // 8, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(low, 8, axis=1), 8, axis=2)
    images = np.clip(images.astype(np.int16) + rng.integers(-12, 12, images.shape), 0, 255).astype(np.uint8)
    source = ArraySource(images, np.arange(n_images) % 50, "bench")
    rec_dir = write_recordio_source(source, os.path.join(root, "rec"), encode="jpeg")
    meta = write_image_folder(source, os.path.join(root, "folder"))
    return {"recordio (JPEG)": RecordIOSource(os.path.join(rec_dir, "train.rec")),
            "image folder (PNG)": FileListSource.from_meta_list(meta)}


def loader_images_per_s(source, workers: int, input_size: int, batch: int = 64) -> float:
    from torch.utils.data import DataLoader

    from virface.data.loading import LabeledUnlabeledDataset, collate_batch
    from virface.data.sampler import LabeledUnlabeledBatchSampler

    dataset = LabeledUnlabeledDataset(source, None, input_size)
    sampler = LabeledUnlabeledBatchSampler(len(source), 0, batch, 0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_batch,
                        persistent_workers=workers > 0)
    it = iter(loader)
    next(it)                                      # worker start-up is not decoding speed
    start, n = time.perf_counter(), 0
    for images, _, _ in it:
        # The flip the stage loop applies on the batch.
        images = torch.where(torch.rand(len(images))[:, None, None, None] < 0.5, images.flip(-1), images)
        n += len(images)
    return n / (time.perf_counter() - start)


def verification_seconds(n_pairs: int = 6000, dim: int = 512, repeats: int = 5) -> float:
    from virface.evaluation.verification import verify_10fold

    rng = np.random.default_rng(0)
    issame = np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], n_pairs // 600)
    base = rng.normal(size=(n_pairs, dim))
    other = np.where(issame[:, None], base + rng.normal(scale=1.0, size=base.shape), rng.normal(size=base.shape))
    emb = np.empty((2 * n_pairs, dim), np.float32)
    emb[0::2], emb[1::2] = base, other
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    verify_10fold(emb, issame)                     # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        verify_10fold(emb, issame)
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    n_images, size = (256, 32) if args.quick else (3000, 112)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as root:
        sources = make_sources(root, n_images, size)
        print(f"loading {n_images} images of {size}x{size}, batch 64, decode + flip (images/s)")
        for name, source in sources.items():
            for workers in (1, 2):
                v = loader_images_per_s(source, workers, size)
                figures[f"{name}, {workers} worker(s)"] = v
                print(f"  {name:<20} {workers} worker(s)  {v:9.0f}")
    seconds = verification_seconds()
    figures["verify_10fold_6000_pairs_s"] = seconds
    print(f"10-fold verification of 6,000 pairs (512-d features): {seconds * 1000:.1f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
