"""The statistics every comparison reports: standard errors, paired differences with intervals
and p-values, and the smallest effect a setup can detect. One place, so that ``--compare``,
``virface-eval`` and the benchmarks say the same thing about the same numbers.

Two sources of noise, and which test fits which design:

- **pair sampling**: an accuracy on N pairs is a proportion; its standard error over pairs is
  ``sqrt(acc (1 - acc) / N)`` (:func:`accuracy_se`). Two models scored on the *same* pairs
  differ only where one is right and the other wrong (the discordant pairs): the paired test
  is McNemar's (:func:`paired_over_pairs`).
- **training noise**: a method and its reference trained from the same start with the same seed
  form a pair; over seeds, the paired t-test (:func:`paired_over_seeds`) asks whether the *mean*
  gain is above zero. Its standard error is ``std / sqrt(seeds)``. Every seed is scored on the
  same pairs, so more seeds do not remove pair-sampling noise:
  :func:`bootstrap_seeds_and_pairs` resamples both.

Differences are ``scale * (a - b)``: points (percent) for accuracies by default.

scipy is imported by the functions that need it, not with this module: it is a second of CPU
at start-up that every trial process and Ray Train rank (which import this module through the
evaluation) would pay for functions only the driver and the benchmarks call.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

CONFIDENCE = 0.95
TIE = 1e-9      # |difference| below this is a tie, whatever the float rounding (0.3 + 0.6 != 0.9)


def accuracy_se(acc: float, n_pairs: int) -> float:
    """Standard error over pairs of an accuracy ``acc`` (a fraction) measured on ``n_pairs``."""
    if n_pairs <= 0:
        raise ValueError(f"n_pairs must be positive, got {n_pairs}")
    return math.sqrt(max(acc * (1.0 - acc), 0.0) / n_pairs)


def signs(differences: Sequence[float]) -> str:
    """One character per difference: ``+``, ``-``, or ``0`` for a tie (within 1e-9)."""
    return "".join("+" if d > TIE else "-" if d < -TIE else "0" for d in differences)


def paired_over_seeds(values: Sequence[float], reference: Sequence[float], scale: float = 100.0,
                      confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Paired t-test over seeds of ``values`` against ``reference`` (same seeds, same order).

    Returns the per-seed differences ``scale * (value - reference)`` (``values``), ``n``,
    ``mean``, sample ``std``, ``se`` = std / sqrt(n), ``t``, the two-sided ``p_value``, the
    ``ci95`` interval ``mean -+ t_{n-1} se`` and ``signs``. With one seed, std, se, t, ci95 and
    p_value are None. Identical differences (std 0) give a zero-width interval and p = 0 when
    their mean is not 0, 1 when it is.
    """
    diffs = [scale * (v - r) for v, r in zip(values, reference, strict=True)]
    n = len(diffs)
    if n == 0:
        raise ValueError("paired_over_seeds needs at least one seed")
    mean = float(np.mean(diffs))
    out: dict[str, Any] = {"values": diffs, "n": n, "mean": mean, "std": None, "se": None,
                           "t": None, "p_value": None, "ci95": None, "signs": signs(diffs)}
    if n < 2:
        return out
    from scipy import stats as scipy_stats

    std = float(np.std(diffs, ddof=1))
    se = std / math.sqrt(n)
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    if se > TIE:
        t = mean / se
        p = float(2 * scipy_stats.t.sf(abs(t), n - 1))
    else:           # every seed moved by the same amount: no spread to test against
        t = math.copysign(math.inf, mean) if abs(mean) > TIE else 0.0
        p = 0.0 if abs(mean) > TIE else 1.0
    out.update(std=std, se=se, t=t, p_value=p, ci95=[mean - half, mean + half])
    return out


def paired_over_pairs(correct_a: np.ndarray, correct_b: np.ndarray, scale: float = 100.0,
                      confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Two models scored on the same pairs: their accuracy difference ``a - b`` in points, its
    standard error over pairs, a Wald ``ci95`` and the exact McNemar ``p_value`` (a two-sided
    binomial test of the discordant pairs; 1.0 when there are none).

    ``correct_a``, ``correct_b``: (N,) bool, whether each model got pair k right.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"correct_a {a.shape} and correct_b {b.shape} must be the same 1-d shape")
    n = a.size
    if n == 0:
        raise ValueError("paired_over_pairs needs at least one pair")
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    diff = (a_only - b_only) / n
    # Per-pair difference d_k in {-1, 0, 1}: var(d) = (a_only + b_only) / n - diff^2.
    se = math.sqrt(max((a_only + b_only) / n - diff * diff, 0.0) / n)
    from scipy import stats as scipy_stats

    z = float(scipy_stats.norm.ppf(0.5 + confidence / 2))
    discordant = a_only + b_only
    p = float(scipy_stats.binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    return {"diff": scale * diff, "se": scale * se,
            "ci95": [scale * (diff - z * se), scale * (diff + z * se)], "p_value": p,
            "n_pairs": n, "n_a_only": a_only, "n_b_only": b_only,
            "acc_a": float(a.mean()), "acc_b": float(b.mean()), "test": "exact McNemar"}


def bootstrap_seeds_and_pairs(correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int = 2000,
                              seed: int = 0, scale: float = 100.0,
                              confidence: float = CONFIDENCE, chunk: int = 100) -> dict[str, Any]:
    """The mean accuracy difference ``a - b`` over seeds with an interval that accounts for both
    training noise and pair sampling: each bootstrap draw resamples the seeds, and the pairs
    (the same resampled pairs for every seed, as every seed is scored on the same pairs).

    ``correct_a``, ``correct_b``: (seeds, pairs) bool. Returns ``mean`` (the observed mean
    difference), ``se`` (the draws' std), the percentile ``ci95``, a two-sided ``p_value``
    (twice the smaller share of draws on either side of 0, at least 1 / n_boot) and ``n_boot``.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"correct_a {a.shape} and correct_b {b.shape} must be the same "
                         "non-empty (seeds, pairs) shape")
    n_seeds, n_pairs = a.shape
    d = a.astype(np.float32) - b.astype(np.float32)                       # (S, P)
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        # Pair weights: how often each pair is drawn, the same for every seed of this draw.
        pair_weights = rng.multinomial(n_pairs, np.full(n_pairs, 1.0 / n_pairs), size=size)
        per_seed = d @ pair_weights.T.astype(np.float32) / n_pairs        # (S, size)
        seed_draws = rng.integers(0, n_seeds, size=(size, n_seeds))
        draws[start:start + size] = per_seed[seed_draws, np.arange(size)[:, None]].mean(axis=1)
    draws *= scale
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(draws, [tail, 1 - tail])
    p = 2 * min(np.mean(draws <= 0), np.mean(draws >= 0))
    return {"mean": scale * float(d.mean()), "se": float(draws.std(ddof=1)),
            "ci95": [float(lo), float(hi)], "p_value": float(min(1.0, max(p, 1.0 / n_boot))),
            "n_boot": n_boot, "n_seeds": n_seeds, "n_pairs": n_pairs}


def min_detectable_effect(se: float, df: int | None = None, alpha: float = 0.05,
                          power: float = 0.8) -> float:
    """The smallest true difference a two-sided test at level ``alpha`` detects with probability
    ``power``, when the estimate's standard error is ``se``: for a t-test with ``df`` degrees of
    freedom (noncentral t, exact), or a z-test when ``df`` is None. In the units of ``se``."""
    from scipy import optimize
    from scipy import stats as scipy_stats

    if se < 0:
        raise ValueError(f"se must be >= 0, got {se}")
    if df is None:
        crit = scipy_stats.norm.ppf(1 - alpha / 2)

        def achieved(delta):
            return scipy_stats.norm.sf(crit - delta) + scipy_stats.norm.cdf(-crit - delta)
    else:
        if df < 1:
            raise ValueError(f"df must be >= 1, got {df}")
        crit = scipy_stats.t.ppf(1 - alpha / 2, df)

        def achieved(delta):
            # The far tail's cdf underflows to NaN for small df and large delta (df=1, delta=8):
            # it is 0 there.
            far = scipy_stats.nct.cdf(-crit, df, delta)
            return scipy_stats.nct.sf(crit, df, delta) + (0.0 if math.isnan(far) else far)
    high = 4.0
    while achieved(high) < power:       # widen the bracket; the noncentral t is NaN far out
        high *= 2
    delta = optimize.brentq(lambda x: achieved(x) - power, 0.0, high, xtol=1e-10)
    return float(delta * se)


def describe(result: dict[str, Any], what: str, unit: str = "points", alpha: float = 0.05) -> str:
    """One line for a :func:`paired_over_seeds` or :func:`paired_over_pairs` result: the mean,
    its standard error, the interval, the p-value and a verdict at ``alpha``."""
    mean = result.get("mean", result.get("diff"))
    if result.get("se") is None or result.get("p_value") is None:
        return f"{what}: {mean:+.2f} {unit} (one seed: no interval, no test)"
    lo, hi = result["ci95"]
    verdict = (("a gain" if mean > 0 else "a loss") + f" (p < {alpha:g})"
               if result["p_value"] < alpha else f"not distinguishable from 0 at {alpha:g}")
    seeds = f", seeds {result['signs']}" if "signs" in result else ""
    return (f"{what}: {mean:+.2f} ± {result['se']:.2f} {unit} (SE), 95% CI [{lo:+.2f}, {hi:+.2f}], "
            f"p = {result['p_value']:.3g}{seeds}: {verdict}")
