"""Face verification: pair sets (insightface ``.bin``, LFW and CFP folders) and the 10-fold
protocol of insightface ``recognition/arcface_torch/eval/verification.py``.

Protocol: embedding = emb(img) + emb(hflip(img)), L2-normalised per image; distance
``||e1 - e2||^2``; thresholds 0, 0.01, ..., 3.99; predict "same" when distance < threshold;
contiguous folds (pairs keep file order, so they are the official folds); each fold's threshold
is the one with the best accuracy on the other folds.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from virface.fileio import atomic_open, read_two_field_lines
from virface.data.images import decode_rgb, normalize_pixels, png_bytes, read_image_file, resize_square
from virface.errors import CorruptImageError, PairSetError
from virface.evaluation.pairs import PairSet
from virface.stats import accuracy_se

THRESHOLDS = np.arange(0, 4, 0.01)
CFP_PROTOCOLS = ("FF", "FP")


# ----------------------------------------------------------------------------- pair sets

def _decode_all(items: Sequence, decode: Callable[[int, object], torch.Tensor],
                image_size: int | None, where: str) -> torch.Tensor:
    """Decode ``items`` into one uint8 (len, 3, H, W) tensor, resizing to image_size if given."""
    out = None
    for i, item in enumerate(items):
        image = decode(i, item)
        if image_size is not None and tuple(image.shape[1:]) != (image_size, image_size):
            image = resize_square(image, image_size)
        if out is None:
            # Preallocated: stacking a list would hold every image twice.
            out = torch.empty((len(items), *image.shape), dtype=torch.uint8)
        elif image.shape != out.shape[1:]:
            raise PairSetError(f"{where}: image {i} is {tuple(image.shape[1:])} but image 0 is "
                               f"{tuple(out.shape[2:])}; pass image_size to resize them")
        out[i] = image
    if out is None:
        raise PairSetError(f"{where}: no images")
    return out


def _check_counts(n_images: int, n_issame: int, where: str) -> None:
    if n_images % 2:
        raise PairSetError(f"{where}: odd number of images ({n_images}); pairs need 2 each")
    if n_images // 2 != n_issame:
        raise PairSetError(f"{where}: {n_images} images make {n_images // 2} pairs, but the "
                           f"issame list has {n_issame} entries")


def load_bin(path: str, image_size: int | None = None, name: str | None = None) -> PairSet:
    """Read an insightface ``.bin``: a pickle of ``(bins, issame_list)``.

    ``bins`` holds 2N encoded images (bytes, or numpy uint8 arrays from cv2.imencode); pair k
    is bins[2k], bins[2k+1]. Returns images uint8 (2N, 3, S, S) when ``image_size=S``.
    The file is a pickle: only open files you trust.
    """
    name = name or os.path.splitext(os.path.basename(path))[0]
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="bytes")
    except Exception as e:  # unpickling bad data raises almost any type
        raise PairSetError(f"{path}: cannot read the .bin pickle ({e})") from e
    if not isinstance(content, (tuple, list)) or len(content) != 2:
        raise PairSetError(f"{path}: expected a pickle of (bins, issame_list)")
    bins, issame = content
    bins, issame = list(bins), np.asarray(list(issame), dtype=bool)
    _check_counts(len(bins), len(issame), path)

    def decode(i, item):
        if not isinstance(item, (bytes, bytearray, memoryview, np.ndarray)):
            raise PairSetError(f"{path}: image {i} is a {type(item).__name__}, expected bytes "
                               f"or a numpy uint8 array")
        try:
            return decode_rgb(item, f"{path} image {i}")
        except CorruptImageError as e:
            raise PairSetError(str(e)) from e

    return PairSet(name, _decode_all(bins, decode, image_size, path), issame)


def write_bin(pair_set: PairSet, path: str) -> str:
    """Write ``pair_set`` as an insightface ``.bin`` (PNG images), atomically. Returns path."""
    bins = [png_bytes(image) for image in pair_set.images]
    issame = [bool(v) for v in pair_set.issame]
    with atomic_open(path) as f:
        pickle.dump((bins, issame), f, protocol=4)
    return path


def _read_image_files(paths: Sequence[str], image_size: int | None, where: str) -> torch.Tensor:
    missing = list(dict.fromkeys(p for p in paths if not os.path.isfile(p)))
    if missing:
        first = "\n  ".join(missing[:5])
        raise PairSetError(f"{where}: {len(missing)} images are missing (no pair is skipped, "
                           f"since that would shift every later pair); the first "
                           f"{min(5, len(missing))}:\n  {first}")

    def decode(i, p):
        try:
            return read_image_file(p)
        except CorruptImageError as e:
            raise PairSetError(f"{where}: image {i}: {e}") from e

    return _decode_all(paths, decode, image_size, where)


def _lfw_image(root: str, person: str, number: int) -> str:
    stem = os.path.join(root, person, f"{person}_{number:04d}")
    for ext in (".jpg", ".png"):
        if os.path.isfile(stem + ext):
            return stem + ext
    return stem + ".jpg"


def load_lfw_folder(root: str, image_size: int | None = None, name: str | None = None) -> PairSet:
    """LFW layout: ``root/pairs.txt`` and images ``root/Name/Name_0001.jpg`` (or .png).

    ``pairs.txt``: optional header line of integers (e.g. ``10 300``), then ``Name n1 n2``
    (same person) or ``Name1 n1 Name2 n2`` (different people). Any missing image is an error.
    """
    pairs_path = os.path.join(root, "pairs.txt")
    if not os.path.isfile(pairs_path):
        raise PairSetError(f"{root}: no pairs.txt (expected an LFW folder)")
    paths, issame = [], []
    with open(pairs_path, "r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if line_no == 1 and len(fields) <= 2 and all(v.isdigit() for v in fields):
                continue  # the "folds pairs_per_fold" header
            try:
                if len(fields) == 3:
                    pair = [(fields[0], int(fields[1])), (fields[0], int(fields[2]))]
                elif len(fields) == 4:
                    pair = [(fields[0], int(fields[1])), (fields[2], int(fields[3]))]
                else:
                    raise ValueError
            except ValueError:
                raise PairSetError(f"{pairs_path}:{line_no}: expected 'Name n1 n2' or "
                                   f"'Name1 n1 Name2 n2', got {line.strip()!r}") from None
            paths += [_lfw_image(root, person, number) for person, number in pair]
            issame.append(len(fields) == 3)
    if not issame:
        raise PairSetError(f"{pairs_path}: no pairs")
    images = _read_image_files(paths, image_size, pairs_path)
    return PairSet(name or "lfw", images, np.asarray(issame))


def _read_cfp_pair_list(path: str) -> dict[int, str]:
    if not os.path.isfile(path):
        raise PairSetError(f"CFP pair list does not exist: {path}")
    folder = os.path.dirname(path)
    return {index: os.path.normpath(os.path.join(folder, relative)) for _, relative, index
            in read_two_field_lines(path, 0, "index relative/path", PairSetError)}


def load_cfp_folder(root: str, protocol: str, image_size: int | None = None,
                    name: str | None = None) -> PairSet:
    """CFP layout: ``root/Protocol/Pair_list_{F,P}.txt`` and
    ``root/Protocol/Split/{FF,FP}/NN/{same,diff}.txt`` with 1-based ``i,j`` lines.

    ``protocol`` is "FF" (both images frontal) or "FP" (frontal, then profile). Pairs are
    ordered split by split (01 same, 01 diff, 02 same, ...), so contiguous folds are the
    official splits.
    """
    protocol = protocol.upper()
    if protocol not in CFP_PROTOCOLS:
        raise PairSetError(f"CFP protocol must be one of {CFP_PROTOCOLS}, got {protocol!r}")
    proto_dir = os.path.join(root, "Protocol")
    frontal = _read_cfp_pair_list(os.path.join(proto_dir, "Pair_list_F.txt"))
    second = frontal if protocol == "FF" else \
        _read_cfp_pair_list(os.path.join(proto_dir, "Pair_list_P.txt"))
    split_dir = os.path.join(proto_dir, "Split", protocol)
    splits = sorted(d for d in os.listdir(split_dir)
                    if os.path.isdir(os.path.join(split_dir, d))) \
        if os.path.isdir(split_dir) else []
    if not splits:
        raise PairSetError(f"{split_dir}: no split folders (expected 01 .. 10)")
    paths, issame = [], []
    for split in splits:
        for kind in ("same", "diff"):
            list_path = os.path.join(split_dir, split, f"{kind}.txt")
            if not os.path.isfile(list_path):
                raise PairSetError(f"CFP split list does not exist: {list_path}")
            with open(list_path, "r", encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    text = line.strip()
                    if not text:
                        continue
                    try:
                        i, j = (int(v) for v in text.split(","))
                        pair = [frontal[i], second[j]]
                    except (ValueError, KeyError):
                        raise PairSetError(f"{list_path}:{line_no}: expected 'i,j' with indexes "
                                           f"from the pair lists, got {text!r}") from None
                    paths += pair
                    issame.append(kind == "same")
    if not issame:
        raise PairSetError(f"{split_dir}: no pairs")
    images = _read_image_files(paths, image_size, f"{split_dir}")
    return PairSet(name or f"cfp_{protocol.lower()}", images, np.asarray(issame))


def open_pair_set(name: str, path: str, image_size: int | None = None) -> PairSet:
    """Open a pair set, choosing the format from ``path``.

    - an insightface ``.bin`` file;
    - a folder with ``pairs.txt`` (LFW);
    - a folder with ``Protocol/`` (CFP); ``name`` picks the protocol by ending in ``ff`` or
      ``fp`` (``cfp_fp``, ``cfpff``, ``CFP-FP``; plain ``cfp`` is refused).
    """
    if os.path.isfile(path) and path.lower().endswith(".bin"):
        return load_bin(path, image_size=image_size, name=name)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "pairs.txt")):
            return load_lfw_folder(path, image_size=image_size, name=name)
        if os.path.isdir(os.path.join(path, "Protocol")):
            # "cfp" itself ends in "fp", so the suffix must stand apart from the word cfp.
            match = re.search(r"(?:^|[^a-z]|cfp)(ff|fp)$", name.lower())
            if match is None:
                raise PairSetError(f"{path} is a CFP folder; name the pair set after its "
                                   f"protocol, e.g. cfp_ff={path} or cfp_fp={path} "
                                   f"(got name {name!r})")
            return load_cfp_folder(path, match.group(1), image_size=image_size, name=name)
    raise PairSetError(f"pair set {name!r}: cannot open {path}; expected an insightface .bin "
                       f"file, an LFW folder holding pairs.txt, or a CFP folder holding Protocol/")


# ----------------------------------------------------------------------------- embeddings

def extract_embeddings(backbone: torch.nn.Module, images_uint8: torch.Tensor,
                       batch_size: int = 256, device: str | torch.device = "cpu",
                       flip: bool = True) -> torch.Tensor:
    """Embed uint8 (N, 3, H, W) RGB images; returns float32 (N, D) on the CPU, each row
    L2-normalised.

    Pixels map to [-1, 1] (:func:`~virface.data.images.normalize_pixels`). With ``flip`` the embedding is
    emb(x) + emb(hflip(x)) before normalising. Normalising per row keeps each image's
    embedding independent of the rest of its batch (the reference normalised over dim 0).
    The backbone runs in eval mode; every submodule's train/eval mode is restored after.
    """
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    chunks = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images_uint8), batch_size):
                x = images_uint8[start:start + batch_size].to(device, non_blocking=True)
                x = normalize_pixels(x)
                emb = backbone(x)
                if flip:
                    emb = emb + backbone(torch.flip(x, dims=[3]))
                chunks.append(torch.nn.functional.normalize(emb.float(), dim=1).cpu())
    finally:
        for module, training in modes:
            module.training = training
    if not chunks:
        return torch.empty((0, 0), dtype=torch.float32)
    return torch.cat(chunks)


# ----------------------------------------------------------------------------- 10-fold protocol

@dataclass
class VerificationResult:
    """Fold means of accuracy and of TAR (VAL) and FAR at the FAR target; stds over folds.

    ``acc_se``: the accuracy's standard error over pairs (binomial, ``virface.stats``); the
    10-fold ``acc_std`` is the spread between folds, not the uncertainty of ``acc``.
    ``best_thresholds`` (n_folds,): the accuracy threshold each fold chose on its other folds.
    ``correct`` (n_pairs,) bool, in pair order: whether each pair was classified right at its
    fold's threshold (what a paired comparison of two models on the same pairs needs).
    """

    acc: float
    acc_std: float
    acc_se: float
    tar_at_far: float
    tar_at_far_std: float
    far: float
    best_thresholds: np.ndarray
    correct: np.ndarray
    n_pairs: int
    far_target: float = 1e-3


def _pair_distances(embeddings, issame: np.ndarray) -> np.ndarray:
    if isinstance(embeddings, (tuple, list)):
        emb1, emb2 = (np.asarray(torch.as_tensor(e).detach().cpu(), dtype=np.float64)
                      for e in embeddings)
    else:
        emb = np.asarray(torch.as_tensor(embeddings).detach().cpu(), dtype=np.float64)
        if emb.ndim != 2 or len(emb) % 2:
            raise ValueError(f"embeddings must be (2N, D) with pairs interleaved, got "
                             f"{emb.shape}")
        emb1, emb2 = emb[0::2], emb[1::2]
    if emb1.shape != emb2.shape or emb1.ndim != 2:
        raise ValueError(f"pair embeddings must both be (N, D), got {emb1.shape} and "
                         f"{emb2.shape}")
    if len(emb1) != len(issame):
        raise ValueError(f"{len(emb1)} embedding pairs but {len(issame)} issame labels")
    return np.sum(np.square(emb1 - emb2), axis=1)


def _counts_below(dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(T,) number of ``dist`` values strictly below each threshold."""
    return np.searchsorted(np.sort(dist), thresholds, side="left")


def _rate(numerator, denominator):
    # A fold without same (or different) pairs has no TAR (or FAR); NaN keeps it out of means.
    return numerator / denominator if denominator > 0 else float("nan")


def _far_threshold(far_train: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """The threshold where the training FAR curve, linear between thresholds, first reaches
    ``far_target``; 0 when it never does (insightface ``calculate_val``)."""
    if far_train.max() < far_target:
        return 0.0
    k = int(np.argmax(far_train >= far_target))
    if k == 0:
        return float(thresholds[0])
    # FAR is a step function of the threshold, so the curve through all points has flat runs;
    # interpolating on the one segment that crosses the target keeps the inverse well defined.
    return float(np.interp(far_target, far_train[k - 1:k + 1], thresholds[k - 1:k + 1]))


def verify_10fold(embeddings, issame, n_folds: int = 10,
                  far_target: float = 1e-3) -> VerificationResult:
    """The insightface verification protocol on pair embeddings.

    ``embeddings``: (2N, D) with pair k in rows 2k, 2k+1, or a tuple (emb1, emb2) of (N, D).
    ``issame``: bool (N,). Folds are contiguous; the threshold maximising accuracy on the
    other folds (first of equals) is scored on the held-out fold, and likewise the threshold
    reaching ``far_target`` on the other folds gives each fold's TAR and FAR.
    """
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    dist = _pair_distances(embeddings, issame)
    n_pairs = len(issame)
    if not 2 <= n_folds <= n_pairs:
        raise ValueError(f"n_folds must be between 2 and the number of pairs ({n_pairs}), "
                         f"got {n_folds}")
    thresholds = THRESHOLDS
    folds = np.array_split(np.arange(n_pairs), n_folds)  # sklearn KFold(shuffle=False) sizes

    # Per fold and threshold: accepted same pairs (true accepts) and accepted different pairs
    # (false accepts); a training set's counts are the totals minus its held-out fold's.
    ta = np.stack([_counts_below(dist[f][issame[f]], thresholds) for f in folds])
    fa = np.stack([_counts_below(dist[f][~issame[f]], thresholds) for f in folds])
    n_same = np.array([issame[f].sum() for f in folds])
    n_diff = np.array([len(f) for f in folds]) - n_same

    acc = np.empty(n_folds)
    tar = np.empty(n_folds)
    far = np.empty(n_folds)
    best = np.empty(n_folds)
    correct = np.empty(n_pairs, dtype=bool)
    for k, test in enumerate(folds):
        ta_train, fa_train = ta.sum(0) - ta[k], fa.sum(0) - fa[k]
        same_train, diff_train = n_same.sum() - n_same[k], n_diff.sum() - n_diff[k]
        acc_train = (ta_train + diff_train - fa_train) / (same_train + diff_train)
        best_index = int(np.argmax(acc_train))
        best[k] = thresholds[best_index]
        acc[k] = (ta[k, best_index] + n_diff[k] - fa[k, best_index]) / len(test)
        correct[test] = (dist[test] < best[k]) == issame[test]

        far_train = fa_train / diff_train if diff_train > 0 else np.zeros_like(thresholds)
        threshold = _far_threshold(far_train, thresholds, far_target)
        accepted = dist[test] < threshold
        tar[k] = _rate(np.sum(accepted & issame[test]), n_same[k])
        far[k] = _rate(np.sum(accepted & ~issame[test]), n_diff[k])

    return VerificationResult(
        acc=float(np.mean(acc)), acc_std=float(np.std(acc)),
        acc_se=accuracy_se(float(np.mean(acc)), n_pairs),
        tar_at_far=float(np.nanmean(tar)) if np.isfinite(tar).any() else float("nan"),
        tar_at_far_std=float(np.nanstd(tar)) if np.isfinite(tar).any() else float("nan"),
        far=float(np.nanmean(far)) if np.isfinite(far).any() else float("nan"),
        best_thresholds=best, correct=correct, n_pairs=n_pairs, far_target=far_target)


def evaluate_pair_set(backbone: torch.nn.Module, pair_set: PairSet,
                      device: str | torch.device = "cpu", batch_size: int = 256,
                      flip: bool = True, n_folds: int = 10,
                      far_target: float = 1e-3) -> VerificationResult:
    """Embed ``pair_set``'s images with ``backbone`` and run :func:`verify_10fold`."""
    embeddings = extract_embeddings(backbone, pair_set.images, batch_size=batch_size,
                                    device=device, flip=flip)
    return verify_10fold(embeddings, pair_set.issame, n_folds=n_folds, far_target=far_target)


def evaluate_pair_sets(backbone: torch.nn.Module, pair_sets: dict[str, PairSet],
                       device: str | torch.device = "cpu", batch_size: int = 256,
                       prefix: str = "") -> dict[str, float]:
    """Every pair set's metrics as ``{<prefix><name>_acc, _acc_se, _acc_std, _tar_far1e-3:
    float}``: what a stage reports per epoch and benchmarks report per run."""
    metrics: dict[str, float] = {}
    for name, pair_set in pair_sets.items():
        result = evaluate_pair_set(backbone, pair_set, device=device, batch_size=batch_size)
        metrics[f"{prefix}{name}_acc"] = float(result.acc)
        metrics[f"{prefix}{name}_acc_se"] = float(result.acc_se)
        metrics[f"{prefix}{name}_acc_std"] = float(result.acc_std)
        metrics[f"{prefix}{name}_tar_far1e-3"] = float(result.tar_at_far)
    return metrics
