"""Built-in synthetic faces: the project's default data when the user gives none.

Renderer v4. An identity is a point in a ``LATENT_DIM``-dimensional Gaussian latent space; a FIXED
map (fixed-seed random matrices and a tanh layer, the same for every spec) turns it into about
ninety face traits: head shape, proportions and feature positions and sizes, skin tone and a
complexion layout (regional tints), hair colour and style, eyes, brows, nose, mouth, ears, beard,
glasses, a birthmark. Every trait mixes many latent dimensions and every latent dimension moves
many traits, so no single trait decides identity and two people can share most of their looks.
Identities come in look-alike families (consecutive identities of a role share part of their
latent), so hard negatives exist. All cues are coarse on purpose, large-scale geometry and colour
layouts rather than sub-pixel detail, so that they survive at 32 x 32 pixels.

Each image is its identity under fresh nuisance: yaw as a continuum up to profile, roll, pitch,
scale, shift, expression (smile, open mouth, blink, raised brows, gaze), lighting, colour cast,
blur, noise, occlusion, background and clothing. The face is painted on an elliptic cylinder, so a
yawed view foreshortens and hides the far side and narrows the outline the way a turned head does.

Randomness has two sources that never mix: identity streams seeded by ``(seed, role, k)`` (and the
family's ``(seed, role, k // FAMILY_SIZE)``) draw the latent, and image streams seeded by the split
draw the nuisance. Backgrounds, clothing and lighting come only from the image streams, so they
carry no identity information. The same spec gives byte-identical arrays on the same machine.

The splits mirror the paper's setting: a labeled "deep" split (many images per identity), an
unlabeled "shallow" split (1-3 images per identity, posed like the deep ones), and two held-out
sets of identities, validation and test, each with three pair sets shaped like LFW, CFP-FF and
CFP-FP. Choices (hyperparameters, epochs) are made on the validation pairs only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from virface.config import ConfigDataclass
from virface.fileio import atomic_open
from virface.data.sources import ArraySource
from virface.errors import ConfigError, DataError
from virface.evaluation.pairs import PairSet

# Bump whenever a change to this file changes the pixels, so stale caches are not reused.
RENDERER_VERSION = 4

PAIR_SET_NAMES = ("synth_lfw", "synth_cfp_ff", "synth_cfp_fp")
N_FOLDS = 10

# Identities live in disjoint ranges by role, so the held-out pairs do not change when the
# labeled or unlabeled split grows, and growing one split does not change the other's identities.
ROLE_VAL, ROLE_LABELED, ROLE_UNLABELED, ROLE_TEST = 0, 1, 2, 3
ROLES = (ROLE_VAL, ROLE_LABELED, ROLE_UNLABELED, ROLE_TEST)
IDENTITY_STRIDE = 1_000_000

# Yaw in degrees. Pair sets: "frontal" is what LFW and CFP's frontal half hold, "profile" matches
# CFP's profile half, where the far eye is hidden or nearly so. Training images (and synth_lfw)
# take yaw from a continuum: a fraction ``profile_prob`` in PROFILE_TRAIN_RANGE, the rest from a
# half-normal below the profile threshold, so every angle in between is seen.
FRONTAL_YAW_SD, FRONTAL_YAW_MAX = 12.0, 30.0
PROFILE_YAW_RANGE = (60.0, 80.0)
PROFILE_THRESHOLD_DEG = 45.0
NEAR_FRONTAL_YAW_SD = 20.0
PROFILE_TRAIN_RANGE = (PROFILE_THRESHOLD_DEG, 85.0)

# The identity latent. FAMILY_SHARE of each identity's latent variance is its family's.
LATENT_DIM = 64
FAMILY_SIZE = 4
FAMILY_SHARE = 0.5
TRAIT_MAP_SEED = 20210619      # fixed: the map from latent to traits is the same for every spec
TRAIT_MAP_HIDDEN = 64
TRAIT_MAP_NONLINEAR = 0.5      # share of each trait's variance that comes through the tanh layer


@dataclass
class SyntheticSpec(ConfigDataclass):
    """What to generate. Defaults build ~10k images at 32x32 in seconds on 2 cores."""

    image_size: int = 32                  # pixels, square; divisible by 16 like the backbones need
    seed: int = 0
    n_labeled_ids: int = 200
    images_per_labeled_id: int = 20       # a "deep" split
    n_unlabeled_ids: int = 1000
    unlabeled_images_per_id: tuple[int, int] = (1, 3)   # inclusive range: a "shallow" split
    n_val_ids: int = 200                  # held out from both training splits; >= 20 makes the
                                          # 10 folds identity-disjoint, like LFW's
    val_pairs: int = 600                  # per pair set; 10 folds x (same half + different half)
    n_test_ids: int | None = None         # the test role's identities; None: n_val_ids
    test_pairs: int | None = None         # per test pair set; None: val_pairs
    profile_prob: float = 0.2             # fraction of labeled/unlabeled images in profile pose
    occlusion_prob: float = 0.05          # fraction of all images with an occluding patch
    supersample: int = 1                  # render this many times larger and area-average down

    def __post_init__(self):
        if isinstance(self.unlabeled_images_per_id, (list, tuple)):   # YAML gives a list
            self.unlabeled_images_per_id = tuple(
                int(x) if isinstance(x, np.integer) else x for x in self.unlabeled_images_per_id)
        # numpy scalars pass validation but not json (the cache key): keep plain Python numbers.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.generic):
                setattr(self, f.name, value.item())
        if self.n_test_ids is None:
            self.n_test_ids = self.n_val_ids
        if self.test_pairs is None:
            self.test_pairs = self.val_pairs
        self.validate()

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
        _int_at_least("n_test_ids", self.n_test_ids, 2)
        for name in ("n_labeled_ids", "n_unlabeled_ids", "n_val_ids", "n_test_ids"):
            if getattr(self, name) >= IDENTITY_STRIDE:
                raise ConfigError(f"{name}: {getattr(self, name)} must be below {IDENTITY_STRIDE}")
        lo_hi = self.unlabeled_images_per_id
        if (not isinstance(lo_hi, tuple) or len(lo_hi) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lo_hi)
                or not 1 <= lo_hi[0] <= lo_hi[1]):
            raise ConfigError(f"unlabeled_images_per_id: {lo_hi!r} must be (min, max) integers "
                              "with 1 <= min <= max")
        for name in ("val_pairs", "test_pairs"):
            value = getattr(self, name)
            _int_at_least(name, value, 2 * N_FOLDS)
            if value % (2 * N_FOLDS):
                raise ConfigError(f"{name}: {value} is not divisible by {2 * N_FOLDS} "
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
    the roles are checkably disjoint; training ignores the unlabeled labels.
    ``labeled_yaw`` / ``unlabeled_yaw``: (N,) float32 degrees per image, |yaw| >= 45 is profile.
    ``pair_sets``: the VALIDATION pair sets (ROLE_VAL identities), for every choice made on data;
    ``test_pair_sets``: the same three kinds over ROLE_TEST identities, for final reports only.
    ``val_identities[name]`` / ``val_yaw[name]`` (and ``test_*``): (2P,) identity index and yaw
    per pair-set image.
    """

    spec: SyntheticSpec
    labeled: ArraySource
    unlabeled: ArraySource
    pair_sets: dict[str, PairSet]
    labeled_yaw: np.ndarray
    unlabeled_yaw: np.ndarray
    val_identities: dict[str, np.ndarray] = field(default_factory=dict)
    val_yaw: dict[str, np.ndarray] = field(default_factory=dict)
    test_pair_sets: dict[str, PairSet] = field(default_factory=dict)
    test_identities: dict[str, np.ndarray] = field(default_factory=dict)
    test_yaw: dict[str, np.ndarray] = field(default_factory=dict)


def is_profile(yaw_deg: np.ndarray) -> np.ndarray:
    """(N,) bool: which yaws (degrees) are profile views rather than frontal-ish ones."""
    return np.abs(np.asarray(yaw_deg)) >= PROFILE_THRESHOLD_DEG


def identity_index(role: int, k: np.ndarray | int) -> np.ndarray:
    """Global identity index of the k-th identity of a role (ROLE_VAL, ROLE_LABELED, ...)."""
    return role * IDENTITY_STRIDE + np.asarray(k, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Identity: a latent vector, mapped through a fixed map into face traits.

# Complexion regions, mirrored left/right: (|t| round the head, tv down the face, sd_t, sd_v). A
# grid of broad, overlapping blobs (6 rows x 3 columns: centre, cheek, side) whose tints add up to
# a smooth person-specific layout, like tan, blush and uneven skin tone. Each blob spans a few
# pixels at 32 px, so the layout survives blur and pose; it is many weak cues rather than one.
_REGIONS = np.array([[t, v, 0.20, 0.14] for v in (-0.7, -0.4, -0.1, 0.2, 0.5, 0.8)
                     for t in (0.0, 0.45, 0.9)], np.float32)

# (name, low, high): every trait is drawn uniformly over its range across identities. Lengths are
# in face units (head half-height = 1, v down), positions round the head in radians.
# Colours are built from several of these scalars below. The ranges of the cues that are easy to
# read (skin tone, hair colour, head and hair shape) are kept narrow and long hair, beards and
# glasses rare: with a few strong cues, a hundred people are told apart by those alone and a
# model learns little more, while real identity is many weak cues, which takes many people to
# learn. That is what makes breadth pay, as it does on real faces (docs/calibration).
TRAIT_RANGES: tuple[tuple[str, float, float], ...] = (
    # head shape
    ("head_a", 0.72, 0.82),            # half-width / half-height
    ("depth", 0.82, 0.94),             # head depth / width: narrows the outline in profile
    ("chin_square", -0.12, 0.72),     # lower face: pointed (<0), round (0), square (1)
    ("jaw", 0.86, 1.04),               # lower-face width
    ("cheek", 0.0, 0.10),              # cheekbone bulge of the outline
    # skin: tone, and a complexion layout of regional tints (symmetric regions, see _REGIONS)
    ("skin_tone", 0.15, 0.55),         # light .. dark
    ("skin_warmth", 0.0, 1.0),         # pink .. olive
    *((f"region_light_{i}", -0.16, 0.16) for i in range(len(_REGIONS))),
    *((f"region_red_{i}", 0.0, 0.35) for i in range(len(_REGIONS))),
    ("mark", 0.0, 1.0),                # a birthmark when above MARK_FROM
    ("mark_t", -1.0, 1.0),
    ("mark_v", -0.5, 0.8),
    ("mark_r", 0.05, 0.10),
    # hair
    ("hair_dark", 0.45, 1.0),
    ("hair_warm", 0.2, 0.6),           # ash .. red/blond
    ("hair_grey", 0.0, 1.0),           # greying when above GREY_FROM
    ("hairline", -0.8, -0.4),
    ("hairline_curve", 0.12, 0.48),   # how far the hairline drops at the temples
    ("hair_part", -0.4, 0.4),          # slant of the hairline
    ("fringe", 0.07, 0.28),            # how far a fringe drops over the forehead ...
    ("fringe_t", -0.6, 0.6),           # ... and where
    ("hair_side", 1.56, 2.04),        # hair covers |angle| beyond this (sideburns, back)
    ("hair_len", 0.0, 1.0),            # short below LONG_HAIR_FROM, long above
    ("hair_volume", 0.068, 0.182),
    # eyes
    ("eye_sep", 0.32, 0.50),
    ("eye_v", -0.14, 0.04),
    ("eye_w", 0.13, 0.20),
    ("eye_h", 0.05, 0.09),
    ("eye_slant", -0.25, 0.25),
    ("eye_shadow", 0.0, 1.0),          # dark sockets / lashes round the eye
    ("iris_light", 0.0, 1.0),          # dark brown .. pale; shifts the mean of a 3-4 px eye
    ("iris_hue", 0.0, 1.0),            # blue .. green for light irises
    # brows
    ("brow_gap", 0.09, 0.18),
    ("brow_thick", 0.04, 0.10),
    ("brow_slant", -0.35, 0.35),
    ("brow_len", 0.14, 0.26),
    ("brow_dark", 0.4, 1.0),           # brow colour = hair x this
    ("brow_arch", 0.0, 0.06),
    # nose
    ("nose_v", 0.24, 0.42),
    ("nose_w", 0.07, 0.15),
    ("nose_depth", 0.12, 0.30),
    ("nostril", 0.3, 0.7),             # nostril darkness
    # mouth
    ("mouth_v", 0.52, 0.70),
    ("mouth_w", 0.20, 0.36),
    ("lip_h", 0.025, 0.065),
    ("mouth_curve", -0.06, 0.06),
    ("lip_red", 0.0, 1.0),
    ("lip_dark", 0.70, 1.05),
    # ears
    ("ear_v", -0.05, 0.15),
    ("ear_size", 0.14, 0.24),
    ("ear_out", 0.0, 1.0),             # how far the ears stand out of a frontal outline
    # beard and glasses: present above their thresholds
    ("beard", 0.0, 1.0),
    ("beard_density", 0.5, 0.95),
    ("glasses", 0.0, 1.0),
    ("frame_dark", 0.0, 1.0),
    ("frame_hue", 0.0, 1.0),
    ("lens_r", 0.17, 0.24),
    ("lens_square", 0.0, 0.8),         # round .. rectangular frames
)
TRAIT_NAMES = tuple(name for name, _, _ in TRAIT_RANGES)

# Where a trait in [0, 1] switches a feature on. Drawn from the latent like every other trait,
# so the accessories correlate with the rest of the face (beard with brows and hair, ...).
MARK_FROM, GREY_FROM, LONG_HAIR_FROM = 0.75, 0.95, 0.85
MOUSTACHE_FROM, FULL_BEARD_FROM, GLASSES_FROM = 0.90, 0.94, 0.94


def _trait_map() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed map's matrices: (linear (T, D), hidden_in (H, D), hidden_out (T, H), scale (T,)).

    Drawn from TRAIT_MAP_SEED, never from the spec: the same latent gives the same face in every
    data set. ``scale`` makes each trait's pre-squash value unit-variance over the latent prior.
    """
    rng = np.random.default_rng(TRAIT_MAP_SEED)
    n, d, h = len(TRAIT_RANGES), LATENT_DIM, TRAIT_MAP_HIDDEN
    linear = rng.normal(size=(n, d))
    linear *= np.sqrt(1 - TRAIT_MAP_NONLINEAR) / np.linalg.norm(linear, axis=1, keepdims=True)
    hidden_in = rng.normal(size=(h, d)) * (1.5 / np.sqrt(d))
    hidden_out = rng.normal(size=(n, h))
    # Scale the tanh branch to its share of the variance, then the sum to unit variance (the
    # branches correlate), both measured on a fixed latent sample.
    probe = rng.normal(size=(4096, d))
    hidden = np.tanh(probe @ hidden_in.T)
    hidden_out *= np.sqrt(TRAIT_MAP_NONLINEAR) / (hidden @ hidden_out.T).std(axis=0)[:, None]
    scale = 1.0 / (probe @ linear.T + hidden @ hidden_out.T).std(axis=0)
    return linear, hidden_in, hidden_out, scale


def identity_latents(seed: int, role: int, ks: np.ndarray) -> np.ndarray:
    """(N, LATENT_DIM) float64 latents of identities ``ks`` of ``role``, N(0, I) marginally.

    Identity k's latent mixes its family's centre (shared by k // FAMILY_SIZE) with its own draw.
    Both come from streams keyed by the identity, so a role's identities do not depend on how
    many of them a spec asks for.
    """
    ks = np.asarray(ks, dtype=np.int64).reshape(-1)
    out = np.empty((len(ks), LATENT_DIM))
    for row, k in enumerate(ks):
        family = np.random.default_rng([seed, 5, role, int(k) // FAMILY_SIZE]).normal(size=LATENT_DIM)
        own = np.random.default_rng([seed, 0, int(identity_index(role, k))]).normal(size=LATENT_DIM)
        out[row] = np.sqrt(FAMILY_SHARE) * family + np.sqrt(1 - FAMILY_SHARE) * own
    return out


def traits_from_latent(latent: np.ndarray) -> dict[str, np.ndarray]:
    """(N, LATENT_DIM) latents -> face traits: dict of (N,) float32 scalars and (N, 3) colours.

    Each trait is a linear mix plus a tanh-layer mix of the whole latent, squashed to (0, 1)
    (about uniform) and stretched over its range in TRAIT_RANGES.
    """
    linear, hidden_in, hidden_out, scale = _trait_map()
    latent = np.asarray(latent, dtype=np.float64).reshape(-1, LATENT_DIM)
    pre = (latent @ linear.T + np.tanh(latent @ hidden_in.T) @ hidden_out.T) * scale   # (N, T), ~N(0, 1)
    # A smooth stand-in for the normal CDF (tanh form): maps N(0, 1) to about uniform on (0, 1).
    q = 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))
    t = {name: lo + (hi - lo) * q[:, i] for i, (name, lo, hi) in enumerate(TRAIT_RANGES)}
    return {k: np.asarray(v, dtype=np.float32) for k, v in _derived_traits(t).items()}


_SKIN_LIGHT = np.array([0.97, 0.82, 0.70])
_SKIN_DARK = np.array([0.33, 0.20, 0.13])
_HAIR_BLACK = np.array([0.07, 0.05, 0.04])
_HAIR_PALE_ASH = np.array([0.75, 0.70, 0.62])
_HAIR_PALE_WARM = np.array([0.85, 0.62, 0.30])
_HAIR_RED = np.array([0.62, 0.25, 0.10])
_HAIR_GREY = np.array([0.80, 0.80, 0.78])


def _derived_traits(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Colours and switches from the raw traits (all (N,) arrays); adds (N, 3) colour arrays."""
    col = lambda x: np.asarray(x)[:, None]     # noqa: E731  (N,) -> (N, 1) for colour maths
    tone = col(t["skin_tone"])
    skin = _SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone
    skin = skin * (1 + (col(t["skin_warmth"]) - 0.5) * np.array([0.02, 0.06, -0.10]))
    t["skin"] = np.clip(skin, 0, 1)
    # Hair: dark identities near black; light ones between ash and warm blond, red in between.
    dark, warm = col(t["hair_dark"]) ** 0.6, col(t["hair_warm"])
    pale = _HAIR_PALE_ASH * (1 - warm) + _HAIR_PALE_WARM * warm
    redness = np.clip(1 - np.abs(warm - 0.75) * 4, 0, 1) * np.clip(1 - np.abs(dark - 0.55) * 3, 0, 1)
    hair = _HAIR_BLACK * dark + pale * (1 - dark)
    hair = hair * (1 - redness) + _HAIR_RED * redness
    grey = col(np.clip((t["hair_grey"] - GREY_FROM) / (1 - GREY_FROM), 0, 1))
    t["hair"] = np.clip(hair * (1 - grey) + _HAIR_GREY * grey, 0, 1)
    long_ = t["hair_len"] >= LONG_HAIR_FROM
    t["hair_len"] = np.where(long_, 0.8 + 1.1 * (t["hair_len"] - LONG_HAIR_FROM) / (1 - LONG_HAIR_FROM),
                             -0.35 + 0.7 * t["hair_len"] / LONG_HAIR_FROM)
    # Irises: dark brown, or pale between blue and green.
    light, hue = col(t["iris_light"]), col(t["iris_hue"])
    pale_iris = np.array([0.30, 0.48, 0.72]) * (1 - hue) + np.array([0.35, 0.55, 0.35]) * hue
    t["iris"] = np.array([0.18, 0.10, 0.05]) * (1 - light) + pale_iris * light
    t["lip"] = np.clip(t["skin"] * np.array([0.85, 0.55, 0.55]) * col(t["lip_dark"])
                       + col(t["lip_red"]) * np.array([0.12, -0.02, -0.02]), 0, 1)
    t["beard"] = np.where(t["beard"] >= FULL_BEARD_FROM, 2.0, np.where(t["beard"] >= MOUSTACHE_FROM, 1.0, 0.0))
    t["glasses"] = (t["glasses"] >= GLASSES_FROM).astype(np.float64)
    frame = np.array([0.05, 0.04, 0.03]) * col(t["frame_dark"]) + (1 - col(t["frame_dark"])) * (
        np.array([0.55, 0.35, 0.15]) * (1 - col(t["frame_hue"])) + np.array([0.6, 0.6, 0.65]) * col(t["frame_hue"]))
    t["frame"] = frame
    t["mark"] = (t["mark"] >= MARK_FROM).astype(np.float64)
    t["region_light"] = np.stack([t.pop(f"region_light_{i}") for i in range(len(_REGIONS))], 1)
    t["region_red"] = np.stack([t.pop(f"region_red_{i}") for i in range(len(_REGIONS))], 1)
    return t


def draw_identity(seed: int, identity: int) -> dict[str, np.ndarray]:
    """Face traits of one identity (a global index, see :func:`identity_index`): float32 scalars
    and (3,) RGB colours in [0, 1], (R,) region tints."""
    role, k = divmod(int(identity), IDENTITY_STRIDE)
    traits = traits_from_latent(identity_latents(seed, role, np.array([k])))
    return {name: value[0] for name, value in traits.items()}


def identity_traits(seed: int, role: int, ks: np.ndarray) -> dict[str, np.ndarray]:
    """Traits of identities ``ks`` of ``role`` at once: dict of (N, ...) float32 arrays."""
    return traits_from_latent(identity_latents(seed, role, ks))


def stack_traits(traits: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """List of per-identity traits -> dict of (N, ...) arrays."""
    return {k: np.stack([t[k] for t in traits]) for k in traits[0]}


# ----------------------------------------------------------------------------------------------
# Nuisance: everything that changes from one image of a person to the next.

def draw_yaw(rng: np.random.Generator, profile: np.ndarray) -> np.ndarray:
    """(N,) degrees for pair sets: frontal-ish (|yaw| <= 30) where ``profile`` is False,
    |yaw| in 60-80 where True."""
    n = len(profile)
    frontal = np.clip(rng.normal(0.0, FRONTAL_YAW_SD, n), -FRONTAL_YAW_MAX, FRONTAL_YAW_MAX)
    side = rng.uniform(*PROFILE_YAW_RANGE, n) * rng.choice([-1.0, 1.0], n)
    return np.where(profile, side, frontal).astype(np.float32)


def draw_training_yaw(rng: np.random.Generator, n: int, profile_prob: float) -> np.ndarray:
    """(n,) degrees from the continuum training images (and synth_lfw) use: a fraction
    ``profile_prob`` uniform in 45-85, the rest half-normal (sd 20) below 45, either side."""
    near = np.abs(rng.normal(0.0, NEAR_FRONTAL_YAW_SD, n))
    near = np.where(near < PROFILE_THRESHOLD_DEG, near, rng.uniform(0, PROFILE_THRESHOLD_DEG, n))
    side = rng.uniform(*PROFILE_TRAIN_RANGE, n)
    yaw = np.where(rng.random(n) < profile_prob, side, near) * rng.choice([-1.0, 1.0], n)
    return yaw.astype(np.float32)


def draw_nuisance(rng: np.random.Generator, yaw_deg: np.ndarray,
                  occlusion_prob: float) -> dict[str, np.ndarray]:
    """Per-image nuisance for images with the given yaw (N,) in degrees: dict of (N, ...)
    float32 arrays (yaw and roll in radians), plus ``noise_seed`` (N,) int64.

    Everything here comes from the image stream ``rng``, never from an identity's stream.
    """
    n = len(yaw_deg)
    u = rng.uniform
    nu: dict[str, Any] = {"yaw": np.radians(yaw_deg)}
    # Geometry: what face alignment leaves over.
    nu["roll"] = np.radians(np.clip(rng.normal(0, 3, n), -7, 7))
    nu["pitch_shift"] = rng.normal(0, 0.03, n)
    nu["scale"] = u(0.9, 1.06, n)
    nu["tx"] = rng.normal(0, 0.03, n)
    nu["ty"] = rng.normal(0, 0.03, n)
    # Expression.
    nu["smile"] = rng.normal(0, 0.03, n)
    nu["mouth_open"] = u(0, 1, n) * (rng.random(n) < 0.3)
    nu["eye_open"] = np.where(rng.random(n) < 0.05, 0.15, u(0.7, 1.1, n))
    nu["brow_raise"] = rng.normal(0, 0.02, n)
    nu["gaze"] = np.clip(rng.normal(0, 0.25, n), -0.5, 0.5)
    nu["hair_jitter"] = rng.normal(0, 0.03, n)
    nu["glasses_off"] = (rng.random(n) < 0.1).astype(np.float64)
    # Lighting and camera.
    light = np.stack([u(-0.9, 0.9, n), u(-0.7, 0.3, n), u(0.5, 1.2, n)], 1)
    nu["light"] = light / np.linalg.norm(light, axis=1, keepdims=True)
    nu["ambient"] = u(0.45, 0.63, n)
    nu["brightness"] = u(0.8, 1.15, n)
    nu["contrast"] = u(0.8, 1.1, n)
    nu["cast"] = np.clip(rng.normal(1.0, 0.05, (n, 3)), 0.85, 1.15)
    nu["blur"] = u(0, 0.4, n) * (rng.random(n) < 0.25)
    nu["noise_sd"] = u(0.0, 0.015, n) * (rng.random(n) < 0.7)
    nu["occlude"] = (rng.random(n) < occlusion_prob).astype(np.float64)
    nu["occ_box"] = np.stack([u(-0.6, 0.6, n), u(-0.5, 0.6, n), u(0.09, 0.27, n), u(0.05, 0.18, n)], 1)
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
# RGB canvas in turn. One function per drawing layer below, called in painting order by
# _render_batch.

_RENDER_BATCH = 64          # images per vectorised batch: big enough to amortise numpy's overhead
_HEAD_HALF_HEIGHT = 0.84    # head half-height in image half-widths at scale 1 (a close face crop)
_HEAD_CENTRE_Y = 0.08       # the face sits a little low, as in aligned crops


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


def _c(values: np.ndarray) -> np.ndarray:
    """(B,) per-image values -> (B, 1, 1), to broadcast over the pixel grid."""
    return values[:, None, None]


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


@dataclass
class _Frame:
    """Geometry of one render batch that every layer uses. Arrays broadcast to (B, H, W).

    Image coordinates X, Y run over [-1, 1]; the face frame (u, v) is in head half-heights, v
    down, after roll, scale and shift; (t, tv) are texture coordinates on the head: t the angle
    round it (0 = nose line, +-pi/2 = ears), tv the height. Painting in (t, tv) foreshortens and
    hides features by yaw.
    """

    b: int
    X: np.ndarray
    Y: np.ndarray
    pixel: np.float32          # one rendered pixel in image units
    dx: np.ndarray             # X, Y relative to the head centre
    dy: np.ndarray
    hs: np.ndarray             # head half-height in image units (B, 1, 1)
    u: np.ndarray
    v: np.ndarray
    edge: np.ndarray           # one rendered pixel in face units
    sin_y: np.ndarray
    cos_y: np.ndarray
    ka: np.ndarray             # outline half-width / head half-width at this yaw
    beta: np.ndarray           # where the yaw-0 front line has moved round the outline
    row_w: np.ndarray          # outline half-width at each row
    head_alpha: np.ndarray
    ratio: np.ndarray          # u / row_w, in [-1, 1]
    t: np.ndarray
    tv: np.ndarray
    light: tuple[np.ndarray, np.ndarray, np.ndarray]
    ambient: np.ndarray


def _face_frame(tr: dict[str, np.ndarray], nu: dict[str, np.ndarray], res: int) -> _Frame:
    """Head pose and outline: an elliptic cylinder of half-width a and half-depth a*depth turned
    by yaw; its outline has half-width a*ka, and the line facing the camera at yaw 0 moves to
    a*ka*sin(beta). The outline's rows: round crown, lower face between pointed and square."""
    f32 = np.float32
    b = len(nu["yaw"])
    grid = ((np.arange(res, dtype=f32) + 0.5) / res * 2 - 1)
    X, Y = grid[None, None, :], grid[None, :, None]
    pixel = f32(2.0 / res)
    hs = _c(nu["scale"]) * f32(_HEAD_HALF_HEIGHT)
    dx, dy = X - _c(nu["tx"]), Y - (_c(nu["ty"]) + f32(_HEAD_CENTRE_Y))
    cr, sr = np.cos(_c(nu["roll"])), np.sin(_c(nu["roll"]))
    u = (cr * dx + sr * dy) / hs
    v = (-sr * dx + cr * dy) / hs
    sin_y, cos_y = np.sin(_c(nu["yaw"])), np.cos(_c(nu["yaw"]))
    a, depth = _c(tr["head_a"]), _c(tr["depth"])
    ka = np.sqrt(cos_y ** 2 + (depth * sin_y) ** 2)
    beta = np.arctan2(depth * sin_y, cos_y)
    vc = np.clip(v, -1, 1)
    round_ = np.sqrt(1 - vc ** 2)
    # Blend a circle with the squarer (1 - v^4)^(1/4); a negative weight gives a pointed chin.
    squared = np.sqrt(np.sqrt(1 - np.square(vc * vc)))
    lower = np.maximum(round_ + _c(tr["chin_square"]) * (squared - round_), 0)
    lower = lower * (1 + (_c(tr["jaw"]) - 1) * np.clip(vc, 0, 1))
    cheek = 1 + _c(tr["cheek"]) * np.exp(-((v - 0.15) / 0.25) ** 2)
    row_w = a * np.where(v < 0, round_, lower) * cheek * ka + f32(1e-4)
    edge = pixel / hs
    ratio = np.clip(u / row_w, -1, 1)
    light = tuple(nu["light"][:, i, None, None] for i in range(3))
    return _Frame(
        b=b, X=X, Y=Y, pixel=pixel, dx=dx, dy=dy, hs=hs, u=u, v=v, edge=edge, sin_y=sin_y,
        cos_y=cos_y, ka=ka, beta=beta, row_w=row_w,
        head_alpha=_alpha(np.maximum(np.abs(u) - row_w, np.abs(v) - 1), edge), ratio=ratio,
        t=np.arcsin(ratio) - beta, tv=v + _c(nu["pitch_shift"]), light=light,
        ambient=_c(nu["ambient"]))


def _lambert(f: _Frame, nx, ny, nz):
    """Brightness of a surface with normal (nx, ny, nz) under the image's light (y down)."""
    lx, ly, lz = f.light
    return f.ambient + (1 - f.ambient) * 1.15 * np.maximum(nx * lx + ny * ly + nz * lz, 0)


def _draw_clothing(scene: _Layers, f: _Frame, nu) -> None:
    # The shoulders do not roll with the head; their colour is the image's, never the person's.
    centre_y = _c(nu["ty"]) + np.float32(_HEAD_CENTRE_Y) + 1.95 * f.hs
    sd = _ellipse_sd(f.dx, f.Y - centre_y, _c(nu["shoulder_w"]) * f.hs, 0.95 * f.hs)
    scene.add(_alpha(sd, f.pixel), nu["cloth"])


def _draw_back_hair(scene: _Layers, f: _Frame, tr, nu) -> None:
    # Hair behind the head: its volume widens the silhouette and long hair falls to the
    # shoulders; it trails away from the direction the face turns.
    vol = _c(tr["hair_volume"])
    hair_len = _c(tr["hair_len"]) + _c(nu["hair_jitter"])
    top = np.sqrt(np.clip(1 - (f.v / (1 + vol)) ** 2, 0, 1))
    width = (_c(tr["head_a"]) * f.ka + vol) * np.where(f.v < 0, top, 1 - 0.12 * np.clip(f.v, 0, 2))
    sd = np.maximum(np.maximum(np.abs(f.u + f.sin_y * _c(tr["head_a"]) * 0.3) - width,
                               f.v - hair_len), -1 - vol - f.v)
    flow = 0.82 + 0.08 * np.sin(14 * f.u + 4 * f.v)      # a coarse wave, not sub-pixel strands
    scene.add(_alpha(sd, f.edge) * (vol > 0), tr["hair"], flow)


def _draw_outline_ears(scene: _Layers, f: _Frame, tr) -> None:
    # Ears that stand out show beside a frontal outline (behind the head layer, so the head
    # hides them as it turns); the ears on the head's sides are painted with the face.
    ear_v, ear_size, out = _c(tr["ear_v"]), _c(tr["ear_size"]), _c(tr["ear_out"])
    side_w = _c(tr["head_a"]) * np.sqrt(1 - np.clip(ear_v, -1, 1) ** 2) * f.cos_y
    for side in (-1.0, 1.0):
        centre = side * (side_w + (0.02 + 0.06 * out) * np.abs(f.cos_y))
        sd = _ellipse_sd(f.u - centre, f.v - ear_v, 0.03 + 0.06 * out, 0.9 * ear_size)
        scene.add(_alpha(sd, f.edge), tr["skin"] * 0.85)


def _draw_neck(scene: _Layers, f: _Frame, tr) -> None:
    # In shadow under the chin.
    sd = np.maximum(np.abs(f.u - 0.1 * f.sin_y) - 0.42 * _c(tr["head_a"]), 0.3 - f.v)
    scene.add(_alpha(sd, f.edge), tr["skin"] * 0.72)


def _draw_skin(face: _Layers, f: _Frame, tr) -> None:
    # Base tone, then the complexion layout: per-region lightness (a brightness field) and
    # redness (a tinted layer), mirrored left/right so that the training flips keep them. These
    # are broad (several pixels), so they survive 32 px, blur and pose.
    t_abs = np.abs(f.t)
    lightness = np.ones_like(f.t)
    redness = np.zeros_like(f.t)
    for r, (t0, v0, sd_t, sd_v) in enumerate(_REGIONS):
        blob = np.exp(-0.5 * (((t_abs - t0) / sd_t) ** 2 + ((f.tv - v0) / sd_v) ** 2))
        lightness = lightness + _c(tr["region_light"][:, r]) * blob
        redness = redness + _c(tr["region_red"][:, r]) * blob
    face.add(np.float32(1.0), tr["skin"], lightness)
    face.add(np.clip(redness, 0, 1), tr["skin"] * np.array([1.0, 0.70, 0.68], np.float32))
    # A birthmark: one dark blob of a few pixels, at the person's own place.
    if np.any(tr["mark"] > 0):
        sd = _ellipse_sd(f.t - _c(tr["mark_t"]), f.tv - _c(tr["mark_v"]), _c(tr["mark_r"]),
                         _c(tr["mark_r"]))
        face.add(_alpha(sd, f.edge) * _c(tr["mark"]), tr["skin"] * np.array([0.55, 0.42, 0.38], np.float32))


def _draw_side_ears(face: _Layers, f: _Frame, tr) -> None:
    # Ears sit at +-pi/2 round the head: edge-on when frontal, in full view in profile.
    ear_v, ear_size = _c(tr["ear_v"]), _c(tr["ear_size"])
    for side in (-1.0, 1.0):
        dt = f.t - side * 1.55
        face.add(_alpha(_ellipse_sd(dt, f.tv - ear_v, 0.55 * ear_size, ear_size), f.edge), tr["skin"] * 0.9)
        face.add(_alpha(_ellipse_sd(dt, f.tv - ear_v, 0.25 * ear_size, 0.6 * ear_size), f.edge),
                 tr["skin"] * 0.62)


def _draw_beard(face: _Layers, f: _Frame, tr) -> None:
    # 2 = full beard, 1 = moustache only. Skipped when no image of the batch has one (a batch
    # spans few identities); a skipped layer would have had zero weight everywhere.
    beard = _c(tr["beard"])
    if not np.any(beard >= 1):
        return
    t, tv = f.t, f.tv
    nose_v, mouth_v, mouth_w = _c(tr["nose_v"]), _c(tr["mouth_v"]), _c(tr["mouth_w"])
    density = _c(tr["beard_density"])
    sd = np.maximum(nose_v + 0.08 + 0.12 * np.abs(t) - tv, np.abs(t) - 1.35)
    face.add(_alpha(sd, f.edge) * (beard >= 2) * density, tr["hair"] * 0.85)
    sd = np.maximum(np.maximum(np.abs(t) - 1.1 * mouth_w, nose_v + 0.03 - tv), tv - mouth_v + 0.01)
    face.add(_alpha(sd, f.edge) * (beard >= 1) * density, tr["hair"] * 0.8)


def _draw_mouth(face: _Layers, f: _Frame, tr, nu) -> None:
    # Lips round a curved centre line, opened and curved by the image's expression.
    mouth_w = _c(tr["mouth_w"])
    tm = f.t / mouth_w
    centre = _c(tr["mouth_v"]) - (_c(tr["mouth_curve"]) + _c(nu["smile"])) * tm ** 2
    taper = np.sqrt(np.clip(1 - tm ** 2, 0, 1))
    opening = _c(nu["mouth_open"]) * 0.035 * taper
    dist = np.abs(f.tv - centre)
    in_mouth = np.abs(tm) < 1
    face.add(_alpha(dist - (_c(tr["lip_h"]) * taper + opening), f.edge) * in_mouth, tr["lip"])
    face.add(_alpha(dist - np.maximum(opening, 0.008 * taper), f.edge) * in_mouth, tr["lip"] * 0.35)


def _draw_eyes(face: _Layers, f: _Frame, tr, nu) -> None:
    # A shadowed socket, the white, the iris (its lightness moves the mean of a 3-4 px eye, which
    # is what is left of eye colour at 32 px) and the pupil, one side at a time.
    eye_v, eye_w = _c(tr["eye_v"]), _c(tr["eye_w"])
    eye_h = _c(tr["eye_h"]) * _c(nu["eye_open"])
    iris_r = _c(tr["eye_h"]) * 1.1
    white = np.full((f.b, 3), 0.85, np.float32)
    for side in (-1.0, 1.0):
        dt = f.t - side * _c(tr["eye_sep"])
        dv = f.tv - eye_v + side * _c(tr["eye_slant"]) * dt
        socket = _ellipse_sd(dt, dv - 0.01, 1.5 * eye_w, 2.4 * _c(tr["eye_h"]))
        face.add(_alpha(socket, f.edge) * (0.15 + 0.45 * _c(tr["eye_shadow"])), tr["skin"] * 0.55)
        sd_eye = _ellipse_sd(dt, dv, eye_w, eye_h)
        face.add(_alpha(np.abs(sd_eye + 0.006) - 0.012, f.edge) * (dv < 0.01), tr["hair"] * 0.3 + 0.02)
        in_eye = _alpha(sd_eye, f.edge)
        face.add(in_eye, white)
        di = dt - _c(nu["gaze"]) * eye_w * 0.5
        face.add(in_eye * _alpha(_ellipse_sd(di, dv, iris_r, iris_r), f.edge), tr["iris"])
        face.add(in_eye * _alpha(_ellipse_sd(di, dv, 0.45 * iris_r, 0.45 * iris_r), f.edge),
                 white * 0.04)


def _draw_brows(face: _Layers, f: _Frame, tr, nu) -> None:
    # Thick enough (0.5-1.3 px) to show; the arch and slant are the person's, the raise the
    # image's expression.
    eye_h = _c(tr["eye_h"]) * _c(nu["eye_open"])
    length = _c(tr["brow_len"])
    for side in (-1.0, 1.0):
        db = f.t - side * (_c(tr["eye_sep"]) + 0.03)
        along = np.clip(db / length, -1, 1)
        line = (_c(tr["eye_v"]) - _c(tr["brow_gap"]) - eye_h * 0.5 - side * _c(tr["brow_slant"]) * db
                - _c(tr["brow_arch"]) * (1 - along ** 2) - _c(nu["brow_raise"]))
        thick = _c(tr["brow_thick"]) * (1 - 0.5 * along ** 2)
        sd = np.maximum(np.abs(db) - length, np.abs(f.tv - line) - thick * 0.5)
        face.add(_alpha(sd, f.edge), tr["hair"] * tr["brow_dark"][:, None])


def _draw_glasses(face: _Layers, f: _Frame, tr, nu) -> None:
    # A rim between an ellipse and a rectangle round each eye, and a bridge; some images show
    # the person without them.
    glasses = _c(tr["glasses"]) * (1 - _c(nu["glasses_off"]))
    if not np.any(glasses > 0):
        return
    t, tv, eye_v, sep = f.t, f.tv, _c(tr["eye_v"]), _c(tr["eye_sep"])
    lens_r, lens_square = _c(tr["lens_r"]), _c(tr["lens_square"])
    for side in (-1.0, 1.0):
        dt, dl = t - side * sep, tv - eye_v
        rim = _ellipse_sd(dt, dl, lens_r, 0.72 * lens_r)
        rim += lens_square * (np.maximum(np.abs(dt) - lens_r, np.abs(dl) - 0.72 * lens_r) - rim)
        face.add(_alpha(np.abs(rim) - 0.018, f.edge) * glasses, tr["frame"])
    bridge = np.maximum(np.abs(t) - (sep - lens_r * 0.9), np.abs(tv - eye_v + 0.03) - 0.015)
    face.add(_alpha(bridge, f.edge) * glasses, tr["frame"])


def _draw_scalp_hair(face: _Layers, f: _Frame, tr, nu) -> None:
    # A hairline that drops at the temples, slants with the parting and may carry a fringe, and
    # hair over the sides and back of the head down to the hair length.
    t, tv = f.t, f.tv
    hairline = (_c(tr["hairline"]) + _c(nu["hair_jitter"]) + _c(tr["hairline_curve"]) * (t / 1.5) ** 2
                + _c(tr["hair_part"]) * t * 0.3
                + _c(tr["fringe"]) * np.exp(-((t - _c(tr["fringe_t"])) / 0.4) ** 2))
    hair_len = _c(tr["hair_len"]) + _c(nu["hair_jitter"])
    sd = np.minimum(tv - hairline,
                    np.maximum(_c(tr["hair_side"]) - np.abs(t),
                               tv - np.maximum(hair_len, _c(tr["ear_v"]) - 0.15)))
    face.add(_alpha(sd, f.edge), tr["hair"], 0.9 + 0.1 * np.sin(14 * t + 5 * tv))


def _head_shading(f: _Frame) -> np.ndarray:
    # Lambert shading on the cylinder's normals (the light mostly comes from above).
    ny = 0.55 * np.clip(f.v, -1, 1)
    nx = f.ratio * np.sqrt(1 - ny ** 2)
    nz = np.sqrt(np.clip(1 - nx ** 2 - ny ** 2, 0, 1))
    return _lambert(f, nx, ny, nz)


def _draw_nose(scene: _Layers, f: _Frame, tr, nu) -> None:
    # A ridge growing from between the eyes to the tip, drawn over the head so that it leaves
    # the outline in profile; nostrils on the side facing the camera.
    u, v, sin_y, cos_y = f.u, f.v, f.sin_y, f.cos_y
    eye_v, nose_v = _c(tr["eye_v"]), _c(tr["nose_v"])
    nose_w, nose_depth = _c(tr["nose_w"]), _c(tr["nose_depth"])
    top_v = eye_v + 0.05
    grow = np.clip((v - top_v) / (nose_v - top_v), 0, 1)
    surface = f.row_w * np.sin(f.beta)
    tip = surface + nose_depth * grow * sin_y
    half = nose_w * (0.35 + 0.65 * grow) * cos_y
    left, right = np.minimum(surface - half, tip), np.maximum(surface + half, tip)
    sd = np.maximum(np.maximum(left - u, u - right), np.maximum(top_v - v, v - nose_v - 0.02))
    across = np.clip((u - 0.5 * (left + right)) / (0.5 * (right - left) + 1e-4), -1, 1) * 0.85
    shade = _lambert(f, across, np.float32(0.2), np.sqrt(1 - across ** 2))
    scene.add(_alpha(sd, f.edge) * (0.5 + 0.5 * np.abs(sin_y)), tr["skin"], shade)
    for side in (-1.0, 1.0):
        cx = surface + side * 0.6 * nose_w * cos_y + 0.7 * nose_depth * sin_y
        sd = _ellipse_sd(u - cx, v - nose_v, 0.035 * cos_y + 0.01, np.float32(0.022))
        scene.add(_alpha(sd, f.edge) * np.clip(1 + 2 * side * sin_y, 0, 1),
                  tr["skin"] * (nu["ambient"] * (1 - tr["nostril"]))[:, None])


def _draw_occluder(scene: _Layers, f: _Frame, nu) -> None:
    # A patch of random colour over part of the face (a hand, a cup, a microphone).
    if not np.any(nu["occlude"] > 0):
        return
    box = nu["occ_box"][:, :, None, None]
    sd = np.maximum(np.abs(f.dx - box[:, 0] * f.hs) - box[:, 2] * f.hs,
                    np.abs(f.dy - box[:, 1] * f.hs) - box[:, 3] * f.hs)
    scene.add(_alpha(sd, f.pixel) * _c(nu["occlude"]), nu["occ_colour"])


def _background(f: _Frame, nu) -> Callable[[int], np.ndarray]:
    """The image's background, one channel at a time (B, H, W): a two-colour ramp plus a wave
    per channel, all from the image stream."""
    ang = _c(nu["bg_angle"])
    ramp = np.clip((f.X * np.cos(ang) + f.Y * np.sin(ang)) * 0.5 + 0.5, 0, 1)
    waves = nu["bg_waves"].reshape(f.b, 3, 4)[:, :, :, None, None]

    def channel(ch: int) -> np.ndarray:
        a_, b_, w = nu["bg_a"][:, ch, None, None], nu["bg_b"][:, ch, None, None], waves[:, ch]
        return a_ + ramp * (b_ - a_) + np.sin(w[:, 0] * f.X + w[:, 1] * f.Y + w[:, 2]) * w[:, 3]

    return channel


def _composite(scene: _Layers, f: _Frame, nu, res: int) -> np.ndarray:
    """(B, res, res, 3) float image: the layers over the background."""
    weights, colours = [], []
    visible = scene.weights(np.ones((f.b, res, res), np.float32), weights, colours)
    background = _background(f, nu)
    # Plain adds in a fixed order, per channel: a layer skipped for the batch would add exact
    # zeros, so an image's pixels do not depend on which other images share its batch.
    img = np.empty((f.b, res, res, 3), np.float32)
    for ch in range(3):
        acc = visible * background(ch)
        for w, colour in zip(weights, colours):
            acc += w * colour[:, ch, None, None]
        img[..., ch] = acc
    return img


def _camera(img: np.ndarray, nu, size: int, supersample: int) -> np.ndarray:
    """Contrast, exposure and white balance, area average, blur, sensor noise -> uint8."""
    b = len(img)
    img = ((img - 0.5) * _c(nu["contrast"])[..., None] + 0.5) * (
        _c(nu["brightness"])[..., None] * nu["cast"][:, None, None, :])
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
    """Draw one batch, bottom layer first. Layers inside ``face`` are painted on the head's
    surface (they foreshorten and hide with yaw) and shaded with it."""
    res = size * supersample
    f = _face_frame(tr, nu, res)
    scene = _Layers()
    _draw_clothing(scene, f, nu)
    _draw_back_hair(scene, f, tr, nu)
    _draw_outline_ears(scene, f, tr)
    _draw_neck(scene, f, tr)
    face = _Layers()
    _draw_skin(face, f, tr)
    _draw_side_ears(face, f, tr)
    _draw_beard(face, f, tr)
    _draw_mouth(face, f, tr, nu)
    _draw_eyes(face, f, tr, nu)
    _draw_brows(face, f, tr, nu)
    _draw_glasses(face, f, tr, nu)
    _draw_scalp_hair(face, f, tr, nu)
    scene.group(f.head_alpha, face, _head_shading(f))
    _draw_nose(scene, f, tr, nu)
    _draw_occluder(scene, f, nu)
    return _camera(_composite(scene, f, nu, res), nu, size, supersample)


# ----------------------------------------------------------------------------------------------
# Splits.

def _render_identities(spec: SyntheticSpec, role: int, counts: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images of identities 0..len(counts)-1 of ``role``, counts[k] images of identity k.

    Each identity's images draw from their own stream, so a split that grows keeps the images it
    had; deep and shallow identities draw pose and all other nuisance from the same distribution.
    Returns (images (N, S, S, 3) uint8, identity indices (N,) int64, yaw (N,) float32).
    """
    size = spec.image_size
    if int(np.sum(counts)) == 0:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.float32)
    parts = []
    for k, count in enumerate(counts):
        rng = np.random.default_rng([spec.seed, 1, role, k])
        parts.append(draw_nuisance(rng, draw_training_yaw(rng, int(count), spec.profile_prob),
                                   spec.occlusion_prob))
    nuisance = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    rows = np.repeat(np.arange(len(counts)), counts)
    traits = {key: value[rows] for key, value in identity_traits(spec.seed, role, np.arange(len(counts))).items()}
    images = render_faces(traits, nuisance, size, spec.supersample)
    return images, identity_index(role, rows), np.degrees(nuisance["yaw"]).astype(np.float32)


# Stream keys of the held-out roles: (fold order, first pair set); pair set i uses key + i.
_PAIR_STREAMS = {ROLE_VAL: (4, 20), ROLE_TEST: (7, 30)}


def _build_pair_set(spec: SyntheticSpec, role: int, set_index: int, n_pairs: int,
                    traits: dict[str, np.ndarray], fold_ids: list[np.ndarray]
                    ) -> tuple[PairSet, np.ndarray, np.ndarray]:
    """One pair set over ``role``'s held-out identities, LFW-ordered: fold by fold, same pairs
    first. Fold f only uses identities ``fold_ids[f]`` (each >= 2 of them). Images: lfw = any
    pose (the training continuum), cfp_ff = frontal/frontal, cfp_fp = frontal then profile.
    Returns (pair set, identity index per image (2P,), yaw per image (2P,))."""
    name = PAIR_SET_NAMES[set_index]
    rng = np.random.default_rng([spec.seed, _PAIR_STREAMS[role][1] + set_index])
    half = n_pairs // (2 * N_FOLDS)
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
    k_img = np.stack([first_k, second_k], 1).ravel()          # (2n,): pair k -> images 2k, 2k+1
    if name == "synth_lfw":
        yaw = draw_training_yaw(rng, 2 * n, spec.profile_prob)
    else:
        profile = np.zeros((n, 2), bool) if name == "synth_cfp_ff" else np.stack(
            [np.zeros(n, bool), np.ones(n, bool)], 1)
        yaw = draw_yaw(rng, profile.ravel())
    nuisance = draw_nuisance(rng, yaw, spec.occlusion_prob)
    images = render_faces({key: val[k_img] for key, val in traits.items()}, nuisance,
                          spec.image_size, spec.supersample)
    pair_set = PairSet(name, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                       np.concatenate(issame))
    return pair_set, identity_index(role, k_img), yaw


def _build_pair_sets(spec: SyntheticSpec, role: int, n_ids: int, n_pairs: int
                     ) -> tuple[dict[str, PairSet], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The three pair sets of a held-out role (ROLE_VAL or ROLE_TEST), each from its own streams."""
    traits = identity_traits(spec.seed, role, np.arange(n_ids))
    order = np.random.default_rng([spec.seed, _PAIR_STREAMS[role][0]]).permutation(n_ids)
    if n_ids >= 2 * N_FOLDS:
        fold_ids = np.array_split(order, N_FOLDS)      # identity-disjoint folds, like LFW's
    else:
        fold_ids = [order] * N_FOLDS                   # too few identities: folds share them
    pair_sets, identities, yaws = {}, {}, {}
    for i, name in enumerate(PAIR_SET_NAMES):
        pair_sets[name], identities[name], yaws[name] = _build_pair_set(
            spec, role, i, n_pairs, traits, fold_ids)
    return pair_sets, identities, yaws


def build_synthetic(spec: SyntheticSpec | None = None) -> SyntheticFaces:
    """Generate every split of ``spec`` (default spec if None). Deterministic given the spec."""
    spec = spec or SyntheticSpec()
    counts = np.full(spec.n_labeled_ids, spec.images_per_labeled_id)
    lab_images, lab_ids, lab_yaw = _render_identities(spec, ROLE_LABELED, counts)
    lo, hi = spec.unlabeled_images_per_id
    counts = np.random.default_rng([spec.seed, 3]).integers(lo, hi + 1, spec.n_unlabeled_ids)
    unl_images, unl_ids, unl_yaw = _render_identities(spec, ROLE_UNLABELED, counts)
    val_sets, val_ids, val_yaw = _build_pair_sets(spec, ROLE_VAL, spec.n_val_ids, spec.val_pairs)
    test_sets, test_ids, test_yaw = _build_pair_sets(spec, ROLE_TEST, spec.n_test_ids, spec.test_pairs)
    return SyntheticFaces(
        spec=spec,
        labeled=ArraySource(lab_images, lab_ids, "synthetic:labeled"),
        unlabeled=ArraySource(unl_images, unl_ids, "synthetic:unlabeled"),
        pair_sets=val_sets, labeled_yaw=lab_yaw, unlabeled_yaw=unl_yaw,
        val_identities=val_ids, val_yaw=val_yaw,
        test_pair_sets=test_sets, test_identities=test_ids, test_yaw=test_yaw)


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
    for prefix, sets, identities, yaws in (
            ("val", faces.pair_sets, faces.val_identities, faces.val_yaw),
            ("test", faces.test_pair_sets, faces.test_identities, faces.test_yaw)):
        for name, ps in sets.items():
            out[f"{prefix}/{name}.images"] = ps.images.numpy()
            out[f"{prefix}/{name}.issame"] = ps.issame
            out[f"{prefix}/{name}.identities"] = identities[name]
            out[f"{prefix}/{name}.yaw"] = yaws[name]
    return out


def _faces_from_arrays(arrays: Mapping[str, np.ndarray], spec: SyntheticSpec) -> SyntheticFaces:
    if str(arrays["spec_json"]) != json.dumps(spec.to_dict(), sort_keys=True):
        raise ValueError("cached spec differs")

    def pair_sets(prefix: str) -> tuple[dict[str, PairSet], dict[str, np.ndarray], dict[str, np.ndarray]]:
        sets = {name: PairSet(name, torch.from_numpy(np.ascontiguousarray(arrays[f"{prefix}/{name}.images"])),
                              arrays[f"{prefix}/{name}.issame"]) for name in PAIR_SET_NAMES}
        return (sets, {n: arrays[f"{prefix}/{n}.identities"] for n in PAIR_SET_NAMES},
                {n: arrays[f"{prefix}/{n}.yaw"] for n in PAIR_SET_NAMES})

    val_sets, val_ids, val_yaw = pair_sets("val")
    test_sets, test_ids, test_yaw = pair_sets("test")
    return SyntheticFaces(
        spec=spec,
        labeled=ArraySource(arrays["labeled_images"], arrays["labeled_ids"], "synthetic:labeled"),
        unlabeled=ArraySource(arrays["unlabeled_images"], arrays["unlabeled_ids"],
                              "synthetic:unlabeled"),
        pair_sets=val_sets, labeled_yaw=arrays["labeled_yaw"], unlabeled_yaw=arrays["unlabeled_yaw"],
        val_identities=val_ids, val_yaw=val_yaw,
        test_pair_sets=test_sets, test_identities=test_ids, test_yaw=test_yaw)


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
    and ``unlabeled_folder/`` (one folder per identity + ``meta.txt``), ``val/<name>.bin`` and
    ``test/<name>.bin``. Returns paths keyed ``labeled_rec``, ``labeled_folder``,
    ``labeled_meta`` (same for ``unlabeled_``), each validation pair set's name and
    ``test_<name>`` for each test pair set (their ``.bin``). Raises DataError if ``out_dir``
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
    for folder, key_prefix, sets in (("val", "", faces.pair_sets), ("test", "test_", faces.test_pair_sets)):
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
        for name, pair_set in sets.items():
            paths[key_prefix + name] = write_bin(pair_set, os.path.join(out_dir, folder, f"{name}.bin"))
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
