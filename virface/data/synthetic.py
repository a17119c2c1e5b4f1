"""Built-in synthetic faces: the project's default data when the user gives none.

A procedural renderer draws each identity as a fixed vector of face traits (head shape, skin
tone, hair, eyes, brows, nose, mouth, ears, beard, glasses, moles) and each image as that
identity under fresh nuisance (yaw up to profile, roll, scale, shift, lighting, colour cast, blur,
noise, occlusion, background, clothing). The face is painted on an elliptic cylinder, so a yawed
view foreshortens and hides the far side and narrows the outline the way a turned head does.

Randomness has two sources that never mix: an identity stream seeded by ``(seed, role, k)`` draws
the traits, and image streams seeded by the split draw the nuisance. Backgrounds, clothing and
lighting come only from the image streams, so they carry no identity information. The same spec
gives byte-identical arrays on the same machine.

The splits mirror the paper's setting: a labeled "deep" split (many images per identity), an
unlabeled "shallow" split (1-3 images per identity) and held-out identities for three pair sets
shaped like LFW, CFP-FF and CFP-FP.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from virface.config import ConfigDataclass
from virface.fileio import atomic_open
from virface.data.sources import ArraySource
from virface.errors import ConfigError, DataError
from virface.evaluation.pairs import PairSet

# Bump whenever a change to this file changes the pixels, so stale caches are not reused.
RENDERER_VERSION = 3

PAIR_SET_NAMES = ("synth_lfw", "synth_cfp_ff", "synth_cfp_fp")
N_FOLDS = 10

# Identities live in disjoint ranges by role, so the held-out pairs do not change when the
# labeled or unlabeled split grows, and growing one split does not change the other's identities.
ROLE_VAL, ROLE_LABELED, ROLE_UNLABELED = 0, 1, 2
IDENTITY_STRIDE = 1_000_000

# Yaw ranges in degrees. "Frontal" is what LFW and CFP's frontal half hold; "profile" matches
# CFP's profile half, where the far eye is hidden or nearly so.
FRONTAL_YAW_SD, FRONTAL_YAW_MAX = 12.0, 30.0
PROFILE_YAW_RANGE = (60.0, 80.0)
PROFILE_THRESHOLD_DEG = 45.0


@dataclass
class SyntheticSpec(ConfigDataclass):
    """What to generate. Defaults build ~9.6k images at 32x32 in a few seconds on 2 cores."""

    image_size: int = 32                  # pixels, square; divisible by 16 like the backbones need
    seed: int = 0
    n_labeled_ids: int = 200
    images_per_labeled_id: int = 20       # a "deep" split
    n_unlabeled_ids: int = 1000
    unlabeled_images_per_id: tuple[int, int] = (1, 3)   # inclusive range: a "shallow" split
    n_val_ids: int = 200                  # held out from both training splits; >= 20 makes the
                                          # 10 folds identity-disjoint, like LFW's
    val_pairs: int = 600                  # per pair set; 10 folds x (same half + different half)
    profile_prob: float = 0.1             # fraction of labeled/unlabeled images in profile pose
    occlusion_prob: float = 0.1           # fraction of all images with an occluding patch
    supersample: int = 1                  # render this many times larger and area-average down

    def __post_init__(self):
        if isinstance(self.unlabeled_images_per_id, (list, tuple)):   # YAML gives a list
            self.unlabeled_images_per_id = tuple(
                int(x) if isinstance(x, np.integer) else x for x in self.unlabeled_images_per_id)
        self.validate()
        # numpy scalars pass validation but not json (the cache key): keep plain Python numbers.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.generic):
                setattr(self, f.name, value.item())

    def validate(self) -> None:
        _int_at_least("image_size", self.image_size, 16)
        if self.image_size % 16:
            raise ConfigError(f"image_size: {self.image_size} is not divisible by 16 "
                              "(the backbones halve it four times)")
        _int_at_least("seed", self.seed, 0)
        _int_at_least("supersample", self.supersample, 1)
        _int_at_least("n_labeled_ids", self.n_labeled_ids, 2)
        _int_at_least("images_per_labeled_id", self.images_per_labeled_id, 1)
        _int_at_least("n_unlabeled_ids", self.n_unlabeled_ids, 0)
        _int_at_least("n_val_ids", self.n_val_ids, 2)
        for name in ("n_labeled_ids", "n_unlabeled_ids", "n_val_ids"):
            if getattr(self, name) >= IDENTITY_STRIDE:
                raise ConfigError(f"{name}: {getattr(self, name)} must be below {IDENTITY_STRIDE}")
        lo_hi = self.unlabeled_images_per_id
        if (not isinstance(lo_hi, tuple) or len(lo_hi) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lo_hi)
                or not 1 <= lo_hi[0] <= lo_hi[1]):
            raise ConfigError(f"unlabeled_images_per_id: {lo_hi!r} must be (min, max) integers "
                              "with 1 <= min <= max")
        _int_at_least("val_pairs", self.val_pairs, 2 * N_FOLDS)
        if self.val_pairs % (2 * N_FOLDS):
            raise ConfigError(f"val_pairs: {self.val_pairs} is not divisible by {2 * N_FOLDS} "
                              f"({N_FOLDS} folds, each half same and half different pairs)")
        for name in ("profile_prob", "occlusion_prob"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0.0 <= value <= 1.0):
                raise ConfigError(f"{name}: {value!r} is outside [0, 1]")

    def cache_key(self) -> str:
        """Hex digest of the fields and the renderer version; names the cache file."""
        text = json.dumps({"spec": self.to_dict(), "renderer": RENDERER_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name}: {value!r} must be an integer >= {low}")


@dataclass
class SyntheticFaces:
    """The generated data.

    ``labeled`` / ``unlabeled``: raw labels are global identity indices (``source.classes``), so
    the three roles are checkably disjoint; training ignores the unlabeled labels.
    ``labeled_yaw`` / ``unlabeled_yaw``: (N,) float32 degrees per image, |yaw| >= 45 is profile.
    ``val_identities[name]`` / ``val_yaw[name]``: (2P,) identity index and yaw per pair-set image.
    """

    spec: SyntheticSpec
    labeled: ArraySource
    unlabeled: ArraySource
    pair_sets: dict[str, PairSet]
    labeled_yaw: np.ndarray
    unlabeled_yaw: np.ndarray
    val_identities: dict[str, np.ndarray] = field(default_factory=dict)
    val_yaw: dict[str, np.ndarray] = field(default_factory=dict)


def is_profile(yaw_deg: np.ndarray) -> np.ndarray:
    """(N,) bool: which yaws (degrees) are profile views rather than frontal-ish ones."""
    return np.abs(np.asarray(yaw_deg)) >= PROFILE_THRESHOLD_DEG


def identity_index(role: int, k: np.ndarray | int) -> np.ndarray:
    """Global identity index of the k-th identity of a role (ROLE_VAL, ROLE_LABELED, ...)."""
    return role * IDENTITY_STRIDE + np.asarray(k, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Identity traits and per-image nuisance: plain dicts of arrays, so a batch renders in one go.

_SKIN_LIGHT = np.array([0.97, 0.82, 0.70])
_SKIN_DARK = np.array([0.33, 0.20, 0.13])
_HAIR_PALETTE = np.array([
    [0.07, 0.05, 0.04], [0.22, 0.13, 0.07], [0.42, 0.27, 0.13], [0.80, 0.64, 0.35],
    [0.58, 0.23, 0.09], [0.55, 0.55, 0.55], [0.88, 0.87, 0.84]])
_HAIR_WEIGHTS = np.array([0.40, 0.30, 0.12, 0.07, 0.03, 0.05, 0.03])
_IRIS_PALETTE = np.array([
    [0.20, 0.11, 0.05], [0.35, 0.22, 0.10], [0.25, 0.45, 0.70], [0.30, 0.50, 0.30],
    [0.45, 0.50, 0.55]])
_IRIS_WEIGHTS = np.array([0.4, 0.25, 0.15, 0.1, 0.1])


def draw_identity(seed: int, identity: int) -> dict[str, np.ndarray]:
    """Face traits of one identity: float scalars and RGB (3,) colours in [0, 1].

    Lengths are in face units (head half-height = 1, v down), angles around the head in radians.
    """
    rng = np.random.default_rng([seed, 0, int(identity)])
    u = rng.uniform
    t: dict[str, Any] = {}
    t["head_a"] = u(0.66, 0.84)                # half-width / half-height
    t["depth"] = u(0.78, 0.95)                 # head depth / width: narrows the outline in profile
    t["chin_square"] = u(-0.35, 1.0)           # lower face: pointed (<0), round (0), square (1)
    t["jaw"] = u(0.82, 1.08)
    tone = rng.beta(1.6, 1.6)
    t["skin"] = np.clip(_SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone + rng.normal(0, 0.025, 3), 0, 1)
    t["blush"] = u(0.0, 0.18)
    # Skin relief: a few faint waves over the face surface (cheekbones, lines, blotches): many
    # small dimensions of identity, meant to reward a model for having seen many people.
    n_waves = 4
    freq = rng.uniform(3.0, 12.0, n_waves) * np.exp(1j * rng.uniform(0, np.pi, n_waves))
    t["relief"] = np.concatenate([freq.real, freq.imag, rng.uniform(0, 2 * np.pi, n_waves),
                                  rng.uniform(0.0, 0.06, n_waves)])     # (f_t, f_v, phase, amp) x 4
    hair = _HAIR_PALETTE[rng.choice(len(_HAIR_PALETTE), p=_HAIR_WEIGHTS)]
    t["hair"] = np.clip(hair * u(0.8, 1.2) + rng.normal(0, 0.03, 3), 0, 1)
    bald = rng.random() < 0.07
    t["hairline"] = -0.98 if bald else u(-0.78, -0.32)
    t["hairline_curve"] = u(0.0, 0.6)          # how far the hairline drops at the temples
    t["hair_part"] = u(-0.35, 0.35)            # fringe slant
    t["hair_side"] = u(1.45, 2.2)              # hair covers |angle| beyond this (sideburns, back)
    long_hair = rng.random() < 0.35
    t["hair_len"] = -1.0 if bald else (u(0.8, 1.9) if long_hair else u(-0.35, 0.35))
    t["hair_volume"] = 0.0 if bald else u(0.04, 0.22)
    t["eye_sep"] = u(0.32, 0.5)
    t["eye_v"] = u(-0.14, 0.04)
    t["eye_w"] = u(0.12, 0.19)
    t["eye_h"] = u(0.05, 0.085)
    t["eye_slant"] = u(-0.25, 0.25)
    t["eye_asym"] = u(-0.12, 0.12)             # one eye larger than the other
    t["brow_asym"] = u(-0.03, 0.03)            # one brow higher than the other
    t["iris"] = np.clip(_IRIS_PALETTE[rng.choice(len(_IRIS_PALETTE), p=_IRIS_WEIGHTS)]
                        + rng.normal(0, 0.03, 3), 0, 1)
    t["brow_gap"] = u(0.09, 0.18)
    t["brow_thick"] = u(0.025, 0.07)
    t["brow_slant"] = u(-0.35, 0.35)
    t["brow_len"] = u(0.14, 0.25)
    t["brow_dark"] = u(0.45, 0.95)             # brow colour = hair x this
    t["nose_v"] = u(0.24, 0.42)
    t["nose_w"] = u(0.07, 0.14)
    t["nose_depth"] = u(0.12, 0.30)
    t["mouth_v"] = u(0.52, 0.68)
    t["mouth_w"] = u(0.2, 0.36)
    t["lip_h"] = u(0.025, 0.06)
    t["mouth_curve"] = u(-0.06, 0.06)
    t["lip"] = np.clip(t["skin"] * np.array([0.85, 0.55, 0.55]) * u(0.8, 1.05)
                       + np.array([0.08, 0.0, 0.0]), 0, 1)
    t["ear_v"] = u(-0.05, 0.15)
    t["ear_size"] = u(0.14, 0.22)
    beard = rng.random()
    t["beard"] = 2.0 if beard < 0.15 else (1.0 if beard < 0.25 else 0.0)   # full, moustache, none
    t["beard_density"] = u(0.5, 0.95)
    t["glasses"] = float(rng.random() < 0.15)
    t["frame"] = rng.uniform(0.0, 0.5, 3) * (rng.random() < 0.7) + 0.03
    t["lens_r"] = u(0.17, 0.24)
    t["lens_square"] = u(0.0, 0.8)             # round .. rectangular frames
    n_moles = rng.choice(3, p=[0.6, 0.3, 0.1])
    moles = np.zeros((2, 3))
    moles[:n_moles] = np.stack([u(-0.8, 0.8, 2), u(-0.4, 0.8, 2), u(0.02, 0.04, 2)], 1)[:n_moles]
    t["moles"] = moles.ravel()                 # (t, v, radius) x 2; radius 0 = none
    return {k: np.asarray(val, dtype=np.float32) for k, val in t.items()}


def stack_traits(traits: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """List of per-identity traits -> dict of (N, ...) arrays."""
    return {k: np.stack([t[k] for t in traits]) for k in traits[0]}


def draw_yaw(rng: np.random.Generator, profile: np.ndarray) -> np.ndarray:
    """(N,) degrees: frontal-ish where ``profile`` is False, |yaw| in 60-80 where True."""
    n = len(profile)
    frontal = np.clip(rng.normal(0.0, FRONTAL_YAW_SD, n), -FRONTAL_YAW_MAX, FRONTAL_YAW_MAX)
    side = rng.uniform(*PROFILE_YAW_RANGE, n) * rng.choice([-1.0, 1.0], n)
    return np.where(profile, side, frontal).astype(np.float32)


def draw_nuisance(rng: np.random.Generator, yaw_deg: np.ndarray,
                  occlusion_prob: float) -> dict[str, np.ndarray]:
    """Per-image nuisance for images with the given yaw (N,) in degrees: dict of (N, ...)
    float32 arrays (yaw and roll in radians), plus ``noise_seed`` (N,) int64.

    Everything here comes from the image stream ``rng``, never from an identity's stream.
    """
    n = len(yaw_deg)
    u = rng.uniform
    nu: dict[str, Any] = {"yaw": np.radians(yaw_deg)}
    nu["roll"] = np.radians(np.clip(rng.normal(0, 6, n), -15, 15))
    nu["pitch_shift"] = rng.normal(0, 0.03, n)
    nu["scale"] = u(0.86, 1.08, n)
    nu["tx"] = rng.normal(0, 0.035, n)
    nu["ty"] = rng.normal(0, 0.035, n)
    nu["smile"] = rng.normal(0, 0.03, n)
    nu["mouth_open"] = u(0, 1, n) * (rng.random(n) < 0.3)
    nu["eye_open"] = np.where(rng.random(n) < 0.05, 0.15, u(0.65, 1.1, n))
    nu["gaze"] = np.clip(rng.normal(0, 0.25, n), -0.5, 0.5)
    nu["hair_jitter"] = rng.normal(0, 0.04, n)
    nu["glasses_off"] = (rng.random(n) < 0.15).astype(np.float64)
    light = np.stack([u(-0.9, 0.9, n), u(-0.7, 0.3, n), u(0.5, 1.2, n)], 1)
    nu["light"] = light / np.linalg.norm(light, axis=1, keepdims=True)
    nu["ambient"] = u(0.3, 0.65, n)
    nu["brightness"] = u(0.75, 1.2, n)
    nu["contrast"] = u(0.75, 1.15, n)
    nu["cast"] = np.clip(rng.normal(1.0, 0.08, (n, 3)), 0.75, 1.25)
    nu["blur"] = u(0, 1, n) * (rng.random(n) < 0.25)
    nu["noise_sd"] = u(0.0, 0.03, n) * (rng.random(n) < 0.7)
    nu["occlude"] = (rng.random(n) < occlusion_prob).astype(np.float64)
    nu["occ_box"] = np.stack([u(-0.6, 0.6, n), u(-0.5, 0.6, n), u(0.15, 0.5, n), u(0.08, 0.35, n)], 1)
    nu["occ_colour"] = rng.uniform(0, 1, (n, 3))
    # Backgrounds: mostly muted colours, like rooms and streets, occasionally vivid.
    for key in ("bg_a", "bg_b"):
        grey = u(0.1, 0.9, (n, 1))
        nu[key] = np.clip(grey + u(0.05, 0.6, (n, 1)) * (rng.uniform(0, 1, (n, 3)) - 0.5), 0, 1)
    nu["bg_angle"] = u(0, 2 * np.pi, n)
    nu["bg_waves"] = np.concatenate([rng.uniform(-9, 9, (n, 3, 2)),           # (fx, fy, phase, amp)
                                     rng.uniform(0, 2 * np.pi, (n, 3, 1)),    # per channel
                                     rng.uniform(0, 0.08, (n, 3, 1))], 2).reshape(n, 12)
    nu["cloth"] = rng.uniform(0, 1, (n, 3)) * u(0.3, 1.0, (n, 1))
    nu["shoulder_w"] = u(1.5, 2.0, n)
    out = {k: np.asarray(v, dtype=np.float32) for k, v in nu.items()}
    # Pixel noise is too big to hold for every image up front; each image keeps the seed of its own.
    out["noise_seed"] = rng.integers(0, 2**62, n, dtype=np.int64)
    return out


# ----------------------------------------------------------------------------------------------
# Renderer. Vectorised over a batch of images and a pixel grid. Every shape is a signed distance
# turned into coverage with a one-pixel ramp (analytic anti-aliasing); ``supersample`` > 1 also
# renders larger and area-averages down. Shapes are collected as layers of (coverage, RGB colour,
# optional brightness field) and composited once, as a weighted sum of the layer colours whose
# weights are worked out on one channel: several times cheaper than blending every layer onto an
# RGB canvas in turn.

_RENDER_BATCH = 64          # images per vectorised batch: big enough to amortise numpy's overhead
_HEAD_HALF_HEIGHT = 0.78    # head half-height in image half-widths at scale 1 (a loose face crop)
_HEAD_CENTRE_Y = 0.06       # the face sits a little low, as in aligned crops


def render_faces(traits: dict[str, np.ndarray], nuisance: dict[str, np.ndarray], size: int,
                 supersample: int = 1, workers: int | None = None) -> np.ndarray:
    """Render N images: ``traits`` and ``nuisance`` hold (N, ...) arrays (one row per image).

    Returns uint8 (N, size, size, 3) RGB. Batches of ``_RENDER_BATCH`` rows render on ``workers``
    threads (numpy releases the GIL). An image depends only on its own row.
    """
    n = len(nuisance["yaw"])
    out = np.empty((n, size, size, 3), dtype=np.uint8)

    def render_slice(start: int) -> None:
        rows = slice(start, start + _RENDER_BATCH)
        out[rows] = _render_batch({k: v[rows] for k, v in traits.items()},
                                  {k: v[rows] for k, v in nuisance.items()}, size, supersample)

    starts = list(range(0, n, _RENDER_BATCH))
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers == 1 or len(starts) <= 1:
        for s in starts:
            render_slice(s)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(render_slice, starts))
    return out


def _alpha(sd: np.ndarray, edge) -> np.ndarray:
    """Coverage from a signed distance (negative inside) with a one-pixel ramp."""
    return np.clip(0.5 - sd / edge, 0.0, 1.0)


def _ellipse_sd(du, dv, ru, rv):
    """Approximate signed distance to an axis-aligned ellipse (exact on circles)."""
    return (np.sqrt((du / ru) ** 2 + (dv / rv) ** 2) - 1.0) * np.minimum(ru, rv)


class _Layers:
    """Shapes in painting order (first = bottom). A group is a layer whose colour is its own
    layer list, e.g. the face texture inside the head outline, shaded as one surface."""

    def __init__(self):
        self.items: list[tuple[Any, Any, Any]] = []

    def add(self, alpha, colour: np.ndarray, brightness=None) -> None:
        """``alpha`` (B, H, W) or broadcastable; ``colour`` (B, 3); ``brightness`` (B, H, W)."""
        self.items.append((alpha, np.asarray(colour, np.float32), brightness))

    def group(self, alpha, layers: "_Layers", brightness=None) -> None:
        self.items.append((alpha, layers, brightness))

    def weights(self, visible, out_w: list, out_c: list, brightness=None):
        """Append each layer's visible weight (B, H, W) and colour (B, 3), top layer first.

        ``visible`` (B, H, W) is how much of the stack shows, and is updated in place to what
        still shows through it.
        """
        for alpha, what, own in reversed(self.items):
            w = alpha * visible
            visible -= w
            scale = own if brightness is None else (brightness if own is None else own * brightness)
            if isinstance(what, _Layers):
                visible += what.weights(w, out_w, out_c, scale)
            else:
                if scale is not None:
                    w *= scale
                out_w.append(w)
                out_c.append(what)
        return visible


def _blur121(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur of (B, H, W, C) with edge replication."""
    p = np.pad(img, ((0, 0), (1, 1), (0, 0), (0, 0)), mode="edge")
    img = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    p = np.pad(img, ((0, 0), (0, 0), (1, 1), (0, 0)), mode="edge")
    return 0.25 * p[:, :, :-2] + 0.5 * p[:, :, 1:-1] + 0.25 * p[:, :, 2:]


def _pixel_noise(seeds: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance noise (B, *shape) float32, a pure function of each image's seed.

    A counter-based 32-bit hash (lowbias32 of seed and pixel index) instead of a Generator per
    image, which cost more than rendering the face. The sum of two 16-bit uniforms is close enough
    to Gaussian for sensor noise.
    """
    seeds = np.asarray(seeds, dtype=np.uint64)
    seed32 = ((seeds ^ (seeds >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    x = seed32[:, None] * np.uint32(0x9E3779B9) + np.arange(int(np.prod(shape)), dtype=np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    uniform_sum = (x >> np.uint32(16)).astype(np.float32) + (x & np.uint32(0xFFFF)).astype(np.float32)
    noise = (uniform_sum * np.float32(2.0 ** -16) - np.float32(1.0)) * np.float32(np.sqrt(6.0))
    return noise.reshape(len(seeds), *shape)


def _render_batch(tr: dict[str, np.ndarray], nu: dict[str, np.ndarray], size: int,
                  supersample: int) -> np.ndarray:
    f32 = np.float32
    res = size * supersample
    b = len(nu["yaw"])
    grid = ((np.arange(res, dtype=f32) + 0.5) / res * 2 - 1)
    X, Y = grid[None, None, :], grid[None, :, None]
    pixel = f32(2.0 / res)

    def s(name, src=tr):        # (B,) -> (B, 1, 1)
        return src[name][:, None, None]

    # Background: a two-colour ramp plus a wave per channel, all from the image stream.
    ang = s("bg_angle", nu)
    ramp = np.clip((X * np.cos(ang) + Y * np.sin(ang)) * 0.5 + 0.5, 0, 1)
    waves = nu["bg_waves"].reshape(b, 3, 4)[:, :, :, None, None]

    def background(ch: int) -> np.ndarray:      # (B, H, W), one channel at a time
        a_, b_, w = nu["bg_a"][:, ch, None, None], nu["bg_b"][:, ch, None, None], waves[:, ch]
        return a_ + ramp * (b_ - a_) + np.sin(w[:, 0] * X + w[:, 1] * Y + w[:, 2]) * w[:, 3]

    # Face frame: (u, v) in head half-heights, v down, after roll, scale and shift.
    hs = s("scale", nu) * f32(_HEAD_HALF_HEIGHT)
    tx, ty = s("tx", nu), s("ty", nu) + f32(_HEAD_CENTRE_Y)
    dx, dy = X - tx, Y - ty
    cr, sr = np.cos(s("roll", nu)), np.sin(s("roll", nu))
    u = (cr * dx + sr * dy) / hs
    v = (-sr * dx + cr * dy) / hs
    edge = pixel / hs                   # one rendered pixel, in face units
    sin_y, cos_y = np.sin(s("yaw", nu)), np.cos(s("yaw", nu))
    a, depth = s("head_a"), s("depth")
    # An elliptic cylinder of half-width a and half-depth a*depth, turned by yaw: its outline
    # has half-width a*ka, and the line facing the camera at yaw 0 moves to a*ka*sin(beta).
    ka = np.sqrt(cos_y ** 2 + (depth * sin_y) ** 2)
    beta = np.arctan2(depth * sin_y, cos_y)
    skin, hair = tr["skin"], tr["hair"]
    lx, ly, lz = (nu["light"][:, i, None, None] for i in range(3))
    ambient = s("ambient", nu)
    scene = _Layers()

    # Clothing: the shoulders do not roll with the head.
    sd = _ellipse_sd(dx, Y - (ty + 1.95 * hs), s("shoulder_w", nu) * hs, 0.95 * hs)
    scene.add(_alpha(sd, pixel), nu["cloth"])

    # Hair behind the head; it trails away from the direction the face turns.
    vol, hair_len = s("hair_volume"), s("hair_len") + s("hair_jitter", nu)
    top = np.sqrt(np.clip(1 - (v / (1 + vol)) ** 2, 0, 1))
    width = (a * ka + vol) * np.where(v < 0, top, 1 - 0.12 * np.clip(v, 0, 2))
    sd = np.maximum(np.maximum(np.abs(u + sin_y * a * 0.3) - width, v - hair_len), -1 - vol - v)
    strands = 0.8 + 0.08 * np.sin(45 * u + 6 * v)
    scene.add(_alpha(sd, edge) * (vol > 0), hair, strands)

    # Neck, in shadow under the chin.
    sd = np.maximum(np.abs(u - 0.1 * sin_y) - 0.42 * a, 0.3 - v)
    scene.add(_alpha(sd, edge), skin * 0.72)

    # Head outline: round crown; the lower face between pointed and square, scaled by the jaw.
    vc = np.clip(v, -1, 1)
    round_ = np.sqrt(1 - vc ** 2)
    # Blend a circle with the squarer (1 - v^4)^(1/4); a negative weight gives a pointed chin.
    squared = np.sqrt(np.sqrt(1 - np.square(vc * vc)))
    lower = np.maximum(round_ + s("chin_square") * (squared - round_), 0)
    lower = lower * (1 + (s("jaw") - 1) * np.clip(vc, 0, 1))
    row_w = a * np.where(v < 0, round_, lower) * ka + f32(1e-4)
    head_alpha = _alpha(np.maximum(np.abs(u) - row_w, np.abs(v) - 1), edge)
    ratio = np.clip(u / row_w, -1, 1)
    # Texture coordinates on the cylinder: t is the angle round the head (0 = nose line,
    # +-pi/2 = ears), tv the height; painting in (t, tv) foreshortens and hides features by yaw.
    t = np.arcsin(ratio) - beta
    tv = v + s("pitch_shift", nu)
    face = _Layers()
    relief = tr["relief"].reshape(b, 4, -1)[:, :, :, None, None]
    texture = 1 + sum(relief[:, 3, k] * np.sin(relief[:, 0, k] * t + relief[:, 1, k] * tv
                                               + relief[:, 2, k]) for k in range(relief.shape[2]))
    face.add(f32(1.0), skin, texture)
    face.add(s("blush") * np.exp(-((np.abs(t) - 0.45) ** 2 / 0.03 + (tv - 0.3) ** 2 / 0.02)),
             skin * np.array([1.0, 0.72, 0.72], f32))
    # Optional traits are skipped when no image in the batch has them (a large saving: a batch
    # spans few identities); a skipped layer would have had zero weight everywhere.
    moles = tr["moles"].reshape(b, 2, 3)[:, :, :, None, None]
    for j in range(2 if np.any(moles[:, :, 2] > 0) else 0):
        t0, v0, r = moles[:, j, 0], moles[:, j, 1], moles[:, j, 2]
        face.add(_alpha(_ellipse_sd(t - t0, tv - v0, r + 1e-6, r + 1e-6), edge) * (r > 0),
                 skin * 0.45)

    # Ears sit at +-pi/2 round the head: edge-on when frontal, in full view in profile.
    ear_v, ear_size = s("ear_v"), s("ear_size")
    for side in (-1.0, 1.0):
        dt = t - side * 1.55
        face.add(_alpha(_ellipse_sd(dt, tv - ear_v, 0.55 * ear_size, ear_size), edge), skin * 0.9)
        face.add(_alpha(_ellipse_sd(dt, tv - ear_v, 0.25 * ear_size, 0.6 * ear_size), edge),
                 skin * 0.62)

    # Beard (2 = full, 1 = moustache only).
    beard = s("beard")
    nose_v, mouth_v, mouth_w = s("nose_v"), s("mouth_v"), s("mouth_w")
    if np.any(beard >= 1):
        stubble = s("beard_density") * (0.8 + 0.2 * np.sin(70 * t) * np.sin(70 * tv))
        sd = np.maximum(nose_v + 0.08 + 0.12 * np.abs(t) - tv, np.abs(t) - 1.35)
        face.add(_alpha(sd, edge) * (beard >= 2) * stubble, hair * 0.85)
        sd = np.maximum(np.maximum(np.abs(t) - 1.1 * mouth_w, nose_v + 0.03 - tv),
                        tv - mouth_v + 0.01)
        face.add(_alpha(sd, edge) * (beard >= 1) * stubble, hair * 0.8)

    # Mouth: lips round a curved centre line, opened by the image's expression.
    tm = t / mouth_w
    centre = mouth_v - (s("mouth_curve") + s("smile", nu)) * tm ** 2
    taper = np.sqrt(np.clip(1 - tm ** 2, 0, 1))
    opening = s("mouth_open", nu) * 0.035 * taper
    dist = np.abs(tv - centre)
    in_mouth = np.abs(tm) < 1
    face.add(_alpha(dist - (s("lip_h") * taper + opening), edge) * in_mouth, tr["lip"])
    face.add(_alpha(dist - np.maximum(opening, 0.008 * taper), edge) * in_mouth, tr["lip"] * 0.35)

    # Eyes, brows and glasses, one side at a time.
    eye_v, eye_w = s("eye_v"), s("eye_w")
    eye_h = s("eye_h") * s("eye_open", nu)
    iris_r = s("eye_h") * 1.1
    glasses = s("glasses") * (1 - s("glasses_off", nu))
    any_glasses = bool(np.any(glasses > 0))
    lens_r, lens_square = s("lens_r"), s("lens_square")
    white = np.full((b, 3), 0.85, f32)
    for side in (-1.0, 1.0):
        dt = t - side * s("eye_sep")
        dv = tv - eye_v + side * s("eye_slant") * dt
        asym = 1 + side * s("eye_asym")
        sd_eye = _ellipse_sd(dt, dv, eye_w * asym, eye_h * asym)
        face.add(_alpha(np.abs(sd_eye + 0.006) - 0.012, edge) * (dv < 0.01), hair * 0.3 + 0.02)
        in_eye = _alpha(sd_eye, edge)
        face.add(in_eye, white)
        di = dt - s("gaze", nu) * eye_w * 0.5
        face.add(in_eye * _alpha(_ellipse_sd(di, dv, iris_r, iris_r), edge), tr["iris"])
        face.add(in_eye * _alpha(_ellipse_sd(di, dv, 0.45 * iris_r, 0.45 * iris_r), edge),
                 white * 0.04)
        db = t - side * (s("eye_sep") + 0.03)
        brow_line = (eye_v - s("brow_gap") - eye_h * 0.5 - side * s("brow_slant") * db
                     + side * s("brow_asym"))
        thick = s("brow_thick") * (1 - 0.5 * (db / s("brow_len")) ** 2)
        sd = np.maximum(np.abs(db) - s("brow_len"), np.abs(tv - brow_line) - thick * 0.5)
        face.add(_alpha(sd, edge), hair * tr["brow_dark"][:, None])
        if not any_glasses:
            continue
        # Glasses: a rim between an ellipse and a rectangle round each eye, and a bridge.
        dl = tv - eye_v
        rim = _ellipse_sd(dt, dl, lens_r, 0.72 * lens_r)
        rim += lens_square * (np.maximum(np.abs(dt) - lens_r, np.abs(dl) - 0.72 * lens_r) - rim)
        face.add(_alpha(np.abs(rim) - 0.014, edge) * glasses, tr["frame"])
    if any_glasses:
        bridge = np.maximum(np.abs(t) - (s("eye_sep") - lens_r * 0.9),
                            np.abs(tv - eye_v + 0.03) - 0.012)
        face.add(_alpha(bridge, edge) * glasses, tr["frame"])

    # Scalp hair: a hairline that drops at the temples, and hair over the sides and back.
    hairline = (s("hairline") + s("hair_jitter", nu) + s("hairline_curve") * (t / 1.5) ** 2
                + s("hair_part") * t * 0.3)
    sd = np.minimum(tv - hairline,
                    np.maximum(s("hair_side") - np.abs(t), tv - np.maximum(hair_len, ear_v - 0.15)))
    face.add(_alpha(sd, edge), hair, 0.9 + 0.1 * np.sin(50 * t + 7 * tv))

    # Lambert shading on the head's normals (y down: the light mostly comes from above).
    ny = 0.55 * vc
    nx = ratio * np.sqrt(1 - ny ** 2)
    nz = np.sqrt(np.clip(1 - nx ** 2 - ny ** 2, 0, 1))
    shade = ambient + (1 - ambient) * 1.15 * np.maximum(nx * lx + ny * ly + nz * lz, 0)
    scene.group(head_alpha, face, shade)

    # Nose: a ridge growing from between the eyes to the tip; it leaves the outline in profile.
    top_v = eye_v + 0.05
    grow = np.clip((v - top_v) / (nose_v - top_v), 0, 1)
    surface = row_w * np.sin(beta)
    tip = surface + s("nose_depth") * grow * sin_y
    half = s("nose_w") * (0.35 + 0.65 * grow) * cos_y
    left, right = np.minimum(surface - half, tip), np.maximum(surface + half, tip)
    sd = np.maximum(np.maximum(left - u, u - right), np.maximum(top_v - v, v - nose_v - 0.02))
    across = np.clip((u - 0.5 * (left + right)) / (0.5 * (right - left) + 1e-4), -1, 1) * 0.85
    nose_shade = ambient + (1 - ambient) * 1.15 * np.maximum(
        across * lx + 0.2 * ly + np.sqrt(1 - across ** 2) * lz, 0)
    scene.add(_alpha(sd, edge) * (0.5 + 0.5 * np.abs(sin_y)), skin, nose_shade)
    for side in (-1.0, 1.0):
        cx = surface + side * 0.6 * s("nose_w") * cos_y + 0.7 * s("nose_depth") * sin_y
        sd = _ellipse_sd(u - cx, v - nose_v, 0.035 * cos_y + 0.01, f32(0.02))
        scene.add(_alpha(sd, edge) * np.clip(1 + 2 * side * sin_y, 0, 1),
                  skin * nu["ambient"][:, None] * 0.5)

    # Occluder: a patch of random colour over part of the face.
    if np.any(nu["occlude"] > 0):
        box = nu["occ_box"][:, :, None, None]
        sd = np.maximum(np.abs(dx - box[:, 0] * hs) - box[:, 2] * hs,
                        np.abs(dy - box[:, 1] * hs) - box[:, 3] * hs)
        scene.add(_alpha(sd, pixel) * s("occlude", nu), nu["occ_colour"])

    weights, colours = [], []
    visible = scene.weights(np.ones((b, res, res), f32), weights, colours)
    # Plain adds in a fixed order, per channel: a layer skipped for the batch would add exact
    # zeros, so an image's pixels do not depend on which other images share its batch.
    img = np.empty((b, res, res, 3), f32)
    for ch in range(3):
        acc = visible * background(ch)
        for w, colour in zip(weights, colours):
            acc += w * colour[:, ch, None, None]
        img[..., ch] = acc

    # Camera: contrast, exposure and white balance, area average, blur, sensor noise.
    img = ((img - 0.5) * s("contrast", nu)[..., None] + 0.5) * (
        s("brightness", nu)[..., None] * nu["cast"][:, None, None, :])
    if supersample > 1:
        img = img.reshape(b, size, supersample, size, supersample, 3).mean(axis=(2, 4))
    # Blur and noise touch only the images that have them (a quarter and most, respectively).
    rows = np.flatnonzero(nu["blur"] > 0)
    if len(rows):
        img[rows] += nu["blur"][rows, None, None, None] * (_blur121(_blur121(img[rows])) - img[rows])
    rows = np.flatnonzero(nu["noise_sd"] > 0)
    if len(rows):
        img[rows] += (_pixel_noise(nu["noise_seed"][rows], (size, size, 3))
                      * nu["noise_sd"][rows, None, None, None])
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Splits.

def _render_identities(spec: SyntheticSpec, role: int, counts: np.ndarray,
                       profile_prob: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images of identities 0..len(counts)-1 of ``role``, counts[k] images of identity k.

    Each identity's images draw from their own stream, so a split that grows keeps the images it
    had. Returns (images (N, S, S, 3) uint8, identity indices (N,) int64, yaw (N,) float32).
    """
    parts_t, parts_n, ids = [], [], []
    for k, count in enumerate(counts):
        ident = int(identity_index(role, k))
        rng = np.random.default_rng([spec.seed, 1, role, k])
        yaw = draw_yaw(rng, rng.random(count) < profile_prob)
        parts_n.append(draw_nuisance(rng, yaw, spec.occlusion_prob))
        parts_t.append(draw_identity(spec.seed, ident))
        ids.append(np.full(count, ident, dtype=np.int64))
    if sum(counts) == 0:
        size = spec.image_size
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.float32)
    ids_all = np.concatenate(ids)
    traits = stack_traits(parts_t)
    rows = np.repeat(np.arange(len(counts)), counts)
    traits = {k: v[rows] for k, v in traits.items()}
    nuisance = {k: np.concatenate([p[k] for p in parts_n]) for k in parts_n[0]}
    images = render_faces(traits, nuisance, spec.image_size, spec.supersample)
    return images, ids_all, np.degrees(nuisance["yaw"]).astype(np.float32)


def _build_pair_set(spec: SyntheticSpec, set_index: int, val_traits: dict[str, np.ndarray],
                    fold_ids: list[np.ndarray]) -> tuple[PairSet, np.ndarray, np.ndarray]:
    """One pair set over the held-out identities, LFW-ordered: fold by fold, same pairs first.

    Fold f only uses identities ``fold_ids[f]`` (each >= 2 of them). Images: lfw = any pose,
    cfp_ff = frontal/frontal, cfp_fp = frontal then profile.
    """
    name = PAIR_SET_NAMES[set_index]
    rng = np.random.default_rng([spec.seed, 2, set_index])
    half = spec.val_pairs // (2 * N_FOLDS)
    first, second, issame = [], [], []
    for ids in fold_ids:
        # Same pairs cycle through the fold's identities so each appears about equally often.
        same = ids[rng.permutation(np.resize(np.arange(len(ids)), half))]
        first.append(same)
        second.append(same)
        issame.append(np.ones(half, bool))
        diff = np.stack([rng.choice(len(ids), 2, replace=False) for _ in range(half)])
        first.append(ids[diff[:, 0]])
        second.append(ids[diff[:, 1]])
        issame.append(np.zeros(half, bool))
    first_k, second_k = np.concatenate(first), np.concatenate(second)
    n = len(first_k)
    if name == "synth_lfw":
        profile = rng.random((n, 2)) < spec.profile_prob
    elif name == "synth_cfp_ff":
        profile = np.zeros((n, 2), bool)
    else:
        profile = np.stack([np.zeros(n, bool), np.ones(n, bool)], 1)
    k_img = np.stack([first_k, second_k], 1).ravel()          # (2n,): pair k -> images 2k, 2k+1
    yaw = draw_yaw(rng, profile.ravel())
    nuisance = draw_nuisance(rng, yaw, spec.occlusion_prob)
    traits = {key: val[k_img] for key, val in val_traits.items()}
    images = render_faces(traits, nuisance, spec.image_size, spec.supersample)
    pair_set = PairSet(name, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                       np.concatenate(issame))
    return pair_set, identity_index(ROLE_VAL, k_img), yaw


def build_synthetic(spec: SyntheticSpec | None = None) -> SyntheticFaces:
    """Generate every split of ``spec`` (default spec if None). Deterministic given the spec."""
    spec = spec or SyntheticSpec()
    counts = np.full(spec.n_labeled_ids, spec.images_per_labeled_id)
    lab_images, lab_ids, lab_yaw = _render_identities(spec, ROLE_LABELED, counts, spec.profile_prob)
    lo, hi = spec.unlabeled_images_per_id
    counts = np.random.default_rng([spec.seed, 3]).integers(lo, hi + 1, spec.n_unlabeled_ids)
    unl_images, unl_ids, unl_yaw = _render_identities(spec, ROLE_UNLABELED, counts, spec.profile_prob)

    val_traits = stack_traits([draw_identity(spec.seed, int(identity_index(ROLE_VAL, k)))
                               for k in range(spec.n_val_ids)])
    order = np.random.default_rng([spec.seed, 4]).permutation(spec.n_val_ids)
    if spec.n_val_ids >= 2 * N_FOLDS:
        fold_ids = np.array_split(order, N_FOLDS)      # identity-disjoint folds, like LFW's
    else:
        fold_ids = [order] * N_FOLDS                   # too few identities: folds share them
    pair_sets, val_ids, val_yaw = {}, {}, {}
    for i, name in enumerate(PAIR_SET_NAMES):
        pair_sets[name], val_ids[name], val_yaw[name] = _build_pair_set(spec, i, val_traits, fold_ids)
    return SyntheticFaces(
        spec=spec,
        labeled=ArraySource(lab_images, lab_ids, "synthetic:labeled"),
        unlabeled=ArraySource(unl_images, unl_ids, "synthetic:unlabeled"),
        pair_sets=pair_sets, labeled_yaw=lab_yaw, unlabeled_yaw=unl_yaw,
        val_identities=val_ids, val_yaw=val_yaw)


# ----------------------------------------------------------------------------------------------
# Cache, export, preview.

def _faces_to_arrays(faces: SyntheticFaces) -> dict[str, np.ndarray]:
    out = {"spec_json": np.array(json.dumps(faces.spec.to_dict(), sort_keys=True)),
           "labeled_images": faces.labeled.images,
           "labeled_ids": faces.labeled.classes[faces.labeled.labels],
           "labeled_yaw": faces.labeled_yaw,
           "unlabeled_images": faces.unlabeled.images,
           "unlabeled_ids": faces.unlabeled.classes[faces.unlabeled.labels],
           "unlabeled_yaw": faces.unlabeled_yaw}
    for name, ps in faces.pair_sets.items():
        out[f"{name}.images"] = ps.images.numpy()
        out[f"{name}.issame"] = ps.issame
        out[f"{name}.identities"] = faces.val_identities[name]
        out[f"{name}.yaw"] = faces.val_yaw[name]
    return out


def _faces_from_arrays(arrays: Mapping[str, np.ndarray], spec: SyntheticSpec) -> SyntheticFaces:
    if str(arrays["spec_json"]) != json.dumps(spec.to_dict(), sort_keys=True):
        raise ValueError("cached spec differs")
    pair_sets = {name: PairSet(name, torch.from_numpy(np.ascontiguousarray(arrays[f"{name}.images"])),
                               arrays[f"{name}.issame"]) for name in PAIR_SET_NAMES}
    return SyntheticFaces(
        spec=spec,
        labeled=ArraySource(arrays["labeled_images"], arrays["labeled_ids"], "synthetic:labeled"),
        unlabeled=ArraySource(arrays["unlabeled_images"], arrays["unlabeled_ids"],
                              "synthetic:unlabeled"),
        pair_sets=pair_sets, labeled_yaw=arrays["labeled_yaw"], unlabeled_yaw=arrays["unlabeled_yaw"],
        val_identities={n: arrays[f"{n}.identities"] for n in PAIR_SET_NAMES},
        val_yaw={n: arrays[f"{n}.yaw"] for n in PAIR_SET_NAMES})


def cache_path(spec: SyntheticSpec, cache_dir: str) -> str:
    """Where :func:`load_synthetic` keeps ``spec``'s data under ``cache_dir``."""
    return os.path.join(cache_dir, f"synthetic-{spec.image_size}px-{spec.cache_key()}.npz")


def load_synthetic(spec: SyntheticSpec | None = None, cache_dir: str | None = None) -> SyntheticFaces:
    """:func:`build_synthetic`, reusing ``cache_dir/synthetic-<S>px-<hash>.npz`` when present.

    The hash covers every spec field and the renderer version. The file is written to a temporary
    name and renamed into place, so readers never see a partial file and processes building the
    same spec at once each leave a complete, identical file. An unreadable or mismatching cache
    file is rebuilt and replaced.
    """
    spec = spec or SyntheticSpec()
    if cache_dir is None:
        return build_synthetic(spec)
    path = cache_path(spec, cache_dir)
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return _faces_from_arrays({k: arrays[k] for k in arrays.files}, spec)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass    # fall through: rebuild and replace it
    faces = build_synthetic(spec)
    with atomic_open(path) as f:
        np.savez(f, **_faces_to_arrays(faces))
    return faces


def export_synthetic(faces: SyntheticFaces, out_dir: str) -> dict[str, str]:
    """Write ``faces`` in the real on-disk formats, so the real readers can be exercised.

    Layout: ``labeled_rec/`` and ``unlabeled_rec/`` (insightface RecordIO), ``labeled_folder/``
    and ``unlabeled_folder/`` (one folder per identity + ``meta.txt``), ``val/<name>.bin``.
    Returns paths keyed ``labeled_rec``, ``labeled_folder``, ``labeled_meta`` (same for
    ``unlabeled_``) and each pair set's name (its ``.bin``). Raises DataError if ``out_dir``
    exists and is not an empty folder.
    """
    from virface.data.files import write_image_folder
    from virface.data.recordio import write_recordio_source
    from virface.evaluation.verification import write_bin

    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise DataError(f"{out_dir}: exists and is not an empty folder; export writes only into "
                        "a new or empty folder")
    paths: dict[str, str] = {}
    for split, source in (("labeled", faces.labeled), ("unlabeled", faces.unlabeled)):
        if len(source) == 0:
            continue    # RecordIO cannot hold an empty set (n_unlabeled_ids = 0)
        paths[f"{split}_rec"] = write_recordio_source(source, os.path.join(out_dir, f"{split}_rec"))
        folder = os.path.join(out_dir, f"{split}_folder")
        paths[f"{split}_meta"] = write_image_folder(source, folder)
        paths[f"{split}_folder"] = folder
    os.makedirs(os.path.join(out_dir, "val"), exist_ok=True)
    for name, pair_set in faces.pair_sets.items():
        paths[name] = write_bin(pair_set, os.path.join(out_dir, "val", f"{name}.bin"))
    return paths


def save_preview(faces: SyntheticFaces, path: str, n_ids: int = 8, per_id: int = 6,
                 zoom: int = 4) -> str:
    """Write a PNG grid: ``n_ids`` rows of ``per_id`` labeled images of one identity each, then one
    row of synth_cfp_fp pairs (frontal, profile, frontal, ...). Returns ``path``."""
    from PIL import Image

    size = faces.spec.image_size

    def row(images: np.ndarray) -> np.ndarray:    # (k, S, S, 3) -> (S, per_id * S, 3), zero-padded
        padded = np.zeros((per_id, size, size, 3), np.uint8)
        padded[:len(images)] = images[:per_id]
        return np.concatenate(list(padded), 1)

    labeled = faces.labeled
    rows = [row(labeled.images[labeled.labels == c]) for c in range(min(n_ids, labeled.num_classes))]
    rows.append(row(faces.pair_sets["synth_cfp_fp"].images[:per_id].permute(0, 2, 3, 1).numpy()))
    grid = np.concatenate(rows, 0)
    image = Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path
