"""Statistics of measured plans: bootstrap CIs, rank correlations, the Pareto front of points.

Percentile bootstrap CIs over evaluation windows say whether a measured difference between
plans is real. Every plan is measured on the same windows, so a difference between two plans
is resampled *paired* (the same windows for both), which removes the text's own variance
from the comparison: what is left is how much the plans disagree window to window.
"""

from __future__ import annotations

import numpy as np

BOOT = 2000


def mean_ci(values, boot: int = BOOT, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """CI of the mean of per-window values (windows weigh equally)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, v.size, (boot, v.size))
    means = v[idx].mean(1)
    a = (1 - level) / 2 * 100
    return float(np.percentile(means, a)), float(np.percentile(means, 100 - a))


def paired_diff_ci(a, b, boot: int = BOOT, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over windows and its CI, resampling the windows of both together."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired windows differ in number: {a.size} and {b.size}")
    d = a - b
    lo, hi = mean_ci(d, boot, seed, level)
    return float(d.mean()), lo, hi


def spearman(a, b) -> float:
    """Spearman's rank correlation; 0 where either side is constant (a constant ranking says nothing)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return 0.0 if np.ptp(a) == 0 or np.ptp(b) == 0 else float(spearmanr(a, b).statistic)


def kendall(a, b) -> float:
    """Kendall's tau; 0 where either side is constant."""
    from scipy.stats import kendalltau

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return 0.0 if np.ptp(a) == 0 or np.ptp(b) == 0 else float(kendalltau(a, b).statistic)


def rank_correlation(predicted: list[float], measured: list[float]) -> dict:
    """Spearman and Kendall rank correlation between a proxy's predictions and measured KL, over the
    pairs where both are finite (NaN below 3 such pairs)."""
    from scipy.stats import kendalltau, spearmanr

    pts = [(p, m) for p, m in zip(predicted, measured) if np.isfinite(p) and np.isfinite(m)]
    if len(pts) < 3:
        return {"plans": len(pts), "spearman": float("nan"), "kendall": float("nan")}
    p, m = zip(*pts)
    return {
        "plans": len(pts),
        "spearman": float(spearmanr(p, m).statistic),
        "kendall": float(kendalltau(p, m).statistic),
    }


def pareto_mask(bits, quality) -> np.ndarray:
    """True for points no other point beats on both (fewer-or-equal bits and lower-or-equal quality)."""
    bits, quality = np.asarray(bits, float), np.asarray(quality, float)
    keep = np.ones(bits.size, dtype=bool)
    for i in range(bits.size):
        dominated = (bits <= bits[i]) & (quality <= quality[i]) & ((bits < bits[i]) | (quality < quality[i]))
        keep[i] = not dominated.any()
    return keep
