"""What the virtual instances carry: diagnostics of a generator on held-out identities, and the
gate that warns before an accuracy run spends its budget on instances that lose identity.

The measurements need two images a, b of one identity the generator was not trained on; they
come from the same-identity pairs of the validation pair sets (identities held out from
training), or, with no pair set, from the labeled data itself (trained on: the figures are then
optimistic, and said so). Per pair, with f the L2-normalised backbone features and G(f) the
instances a sampler draws from f:

- ``vi_draw_cos``: the mean cosine between two draws from one source (1 for a deterministic
  generator), to read against ``vi_real_cos``, the mean cos(f_a, f_b) of real same-identity images;
- ``vi_identity_keep``: mean cos(G(f_a), f_b) - mean cos(f_a, f_b): > 0 when the instances of a
  lie nearer the identity's other image than a itself does;
- ``vi_w_pull``: mean over instances of max_j cos(G(f_a), W_j) - max_j cos(f_a, W_j): how far the
  instances drift towards the labeled class centres;
- ``vi_own_class_share``: the share of instances whose own virtual class wins (highest cosine)
  against [W; the sources of their batch], the competition L_vi sets them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from virface.errors import VirFaceError
from virface.generator import CovarianceTransfer
from virface.metrics import format_instance_metrics

log = logging.getLogger("virface")

# A sampler draws instances: sources (n, D) L2-normalised -> (draws * n, D) L2-normalised,
# sample-major ([draw 1 of all n; draw 2 of all n; ...]), as FeatureVAE.sample does.
InstanceSampler = Callable[[torch.Tensor, int], torch.Tensor]

DEFAULT_MAX_PAIRS = 512


@torch.no_grad()
def instance_diagnostics(sample: InstanceSampler, f_a: torch.Tensor, f_b: torch.Tensor,
                         weight: torch.Tensor, draws: int = 2,
                         virtual_classes: int | None = None) -> dict[str, float]:
    """The diagnostics (module docstring) of ``sample`` on n same-identity pairs.

    f_a, f_b: (n, D) features of images a and b of each pair (normalised here); weight: (C, D)
    the labeled class weights W. ``draws`` >= 2 instances per source. ``virtual_classes``: how
    many sources compete as virtual classes at once for ``vi_own_class_share`` (the training's
    unlabeled batch size; default: all n).
    """
    if draws < 2:
        raise ValueError(f"draws must be >= 2 (the draw spread compares two draws), got {draws}")
    f_a, f_b = F.normalize(f_a.float(), dim=1), F.normalize(f_b.float(), dim=1)
    w = F.normalize(weight.float(), dim=1).to(f_a.device)
    n = f_a.shape[0]
    inst = F.normalize(sample(f_a, draws).float(), dim=1).view(draws, n, -1)
    real = (f_a * f_b).sum(1)
    draw_cos = torch.stack([(inst[k] * inst[k + 1]).sum(1) for k in range(draws - 1)])
    keep = (inst * f_b).sum(2) - real                       # (draws, n)
    pull = (inst @ w.t()).amax(2) - (f_a @ w.t()).amax(1)   # (draws, n)
    group = virtual_classes or n
    wins = []
    for start in range(0, n, group):
        u = f_a[start:start + group]
        centres = torch.cat([w, u])
        cos = inst[:, start:start + group] @ centres.t()    # (draws, g, C + g)
        own = w.shape[0] + torch.arange(u.shape[0], device=u.device)
        wins.append((cos.argmax(2) == own).float().flatten())
    return {"vi_draw_cos": float(draw_cos.mean()), "vi_real_cos": float(real.mean()),
            "vi_identity_keep": float(keep.mean()), "vi_w_pull": float(pull.mean()),
            "vi_own_class_share": float(torch.cat(wins).mean())}


# ---------------------------------------------------------------- the pairs and their features


@dataclass
class DiagnosticPairs:
    """uint8 images (n, 3, S, S) of a and of b, n same-identity pairs; ``held_out``: whether the
    identities were kept out of training; ``source``: where they came from, for the log."""

    images_a: torch.Tensor
    images_b: torch.Tensor
    held_out: bool
    source: str

    def __len__(self) -> int:
        return int(self.images_a.shape[0])


def _evenly(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    return np.arange(n) if k >= n else np.linspace(0, n - 1, k).round().astype(np.int64)


def diagnostic_pairs(data, max_pairs: int = DEFAULT_MAX_PAIRS) -> DiagnosticPairs | None:
    """Up to ``max_pairs`` same-identity pairs from ``data`` (a StageData): the validation pair
    sets' same pairs, pooled in name order and taken evenly; without pair sets, the first two
    images of identities of the labeled data. None when neither has a pair."""
    from virface.data.loading import read_images

    a, b, names = [], [], []
    for name in sorted(data.pair_sets):
        ps = data.pair_sets[name]
        same = np.flatnonzero(ps.issame)
        if len(same):
            a.append(ps.images[2 * same])
            b.append(ps.images[2 * same + 1])
            names.append(name)
    if a:
        images_a, images_b = torch.cat(a), torch.cat(b)
        keep = torch.from_numpy(_evenly(len(images_a), max_pairs))
        return DiagnosticPairs(images_a[keep], images_b[keep], True,
                               f"{len(keep)} same-identity pairs of the validation sets {names}")
    labels = np.asarray(data.labeled.labels)
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    firsts = starts[sizes >= 2]
    if not len(firsts):
        return None
    firsts = firsts[_evenly(len(firsts), max_pairs)]
    size = data.input_size
    return DiagnosticPairs(read_images(data.labeled, order[firsts], size),
                           read_images(data.labeled, order[firsts + 1], size), False,
                           f"{len(firsts)} identities of the labeled data {data.labeled.name} "
                           f"(trained on: no validation pair set given)")


def pair_features(backbone: torch.nn.Module, pairs: DiagnosticPairs,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_a, f_b), each (n, D) L2-normalised on ``device``: the backbone in eval mode, no flip
    (a training step's features are single images too)."""
    from virface.evaluation.verification import extract_embeddings

    return tuple(extract_embeddings(backbone, images, device=device, flip=False).to(device)
                 for images in (pairs.images_a, pairs.images_b))


def measure_instances(sample: InstanceSampler, f_a: torch.Tensor, f_b: torch.Tensor,
                      weight: torch.Tensor, draws: int, virtual_classes: int | None,
                      seed: int = 0) -> dict[str, float]:
    """:func:`instance_diagnostics` with its draws seeded and the caller's random streams left
    as they were (a run's training draws do not depend on whether it is diagnosed)."""
    devices = [f_a.device] if f_a.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return instance_diagnostics(sample, f_a, f_b, weight, max(2, draws), virtual_classes)


# ---------------------------------------------------------------- the gate


class IdentityLossError(VirFaceError):
    """A generator's instances lose identity (identity keep < 0) and the caller did not go on."""


def identity_gate(metrics: dict[str, float], generator: str, go_on: bool = False,
                  where: str = "") -> bool:
    """Check a generator's diagnostics before an accuracy run. Returns True when its instances
    keep identity (``vi_identity_keep`` >= 0). Otherwise logs a warning naming ``generator``
    (its checkpoint, or what draws the instances) and the figures, and then returns False if
    ``go_on``, else raises :class:`IdentityLossError`."""
    keep = metrics["vi_identity_keep"]
    if keep >= 0:
        log.info("%sgenerator %s: %s", where, generator, format_instance_metrics(metrics))
        return True
    message = (f"{where}generator {generator}: its instances lose identity: {format_instance_metrics(metrics)}; "
               f"an instance of image a lies further from image b of its identity than a itself, "
               f"so L_vi trains on instances of the wrong identity")
    log.warning("%s", message)
    if not go_on:
        raise IdentityLossError(message + " (go_on=True goes on anyway)")
    return False


def generator_gate(checkpoint: str, data, go_on: bool = False, device: str = "cpu",
                   **config_changes) -> dict[str, float]:
    """The gate a benchmark calls before spending its budget on the generator in ``checkpoint``
    (a generator- or virface-stage checkpoint): measures its instances on ``data``'s pairs
    (a StageData) with the virface stage's sampler (``config_changes``: e.g. vi_generator to
    measure another sampler) and applies :func:`identity_gate`. Returns the figures."""
    from virface.checkpoint import load_checkpoint, load_models
    from virface.config import TrainConfig
    from virface.models import build_models

    state = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict({**state["config"], "method": "virface", "pretrained_file": None,
                                    "resume_file": None, "device": device, **config_changes})
    models = build_models(config)
    load_models(models, state, checkpoint)
    dev = torch.device(device)
    for module in models.modules():
        module.to(dev).eval()
    pairs = diagnostic_pairs(data)
    if pairs is None:
        raise VirFaceError(f"{checkpoint}: no same-identity pair to measure the generator on "
                           f"(no validation pair set, and no labeled identity with two images)")
    f_a, f_b = pair_features(models.backbone, pairs, dev)
    sample = build_instance_sampler(config, models, data, dev).sample
    metrics = measure_instances(sample, f_a, f_b, models.head.state_dict()["weight"], config.gen_num,
                                config.unlabel_batch_size, config.seed)
    identity_gate(metrics, checkpoint, go_on)
    return metrics


def variation_sample(labels: np.ndarray, n_images: int) -> np.ndarray:
    """Indices of about ``n_images`` labeled images for within-identity statistics: whole
    identities of >= 2 images, spread evenly over the identities (sorted by label)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    multi = np.flatnonzero(ends - starts >= 2)
    if not len(multi):
        return np.empty(0, dtype=np.int64)
    mean_size = float(np.mean(ends[multi] - starts[multi]))
    chosen = multi[_evenly(len(multi), max(1, int(round(n_images / mean_size))))]
    return np.concatenate([order[starts[k]:ends[k]] for k in chosen])


def labeled_features(backbone: torch.nn.Module, data, n_images: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) L2-normalised, labels (N,)) of :func:`variation_sample`'s images of
    ``data.labeled``, on ``device``; the backbone in eval mode, no flip."""
    from virface.data.loading import read_images
    from virface.evaluation.verification import extract_embeddings

    index = variation_sample(data.labeled.labels, n_images)
    if not len(index):
        raise VirFaceError(f"{data.labeled.name}: within-identity variation needs identities of at "
                           f"least two images; none has")
    feats = extract_embeddings(backbone, read_images(data.labeled, index, data.input_size),
                               device=device, flip=False)
    return feats.to(device), torch.as_tensor(np.asarray(data.labeled.labels)[index], device=device)


def build_instance_sampler(config, models, data, device: torch.device):
    """What draws a virface stage's instances (``.sample(sources, n)``): the generator, or with
    ``vi_generator: covariance`` a CovarianceTransfer estimated from the backbone's features of
    ``variation_images`` labeled images of ``data`` (a StageData)."""
    if config.vi_generator != "covariance":
        return models.generator
    feats, labels = labeled_features(models.backbone, data, config.variation_images, device)
    return CovarianceTransfer.from_features(feats, labels, config.cov_rank, config.cov_scale,
                                            config.cov_shrink)
