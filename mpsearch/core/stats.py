"""Percentile bootstrap CIs over evaluation windows: is a measured difference between plans real?

Every plan is measured on the same windows, so a difference between two plans is
resampled *paired* (the same windows for both), which removes the text's own variance
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
