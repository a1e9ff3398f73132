"""Exact presolve for the MILP: options no optimal plan can use are removed before HiGHS sees them."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def padded_rows(table: Sequence[np.ndarray], k_max: int) -> np.ndarray:
    """Decision x option array; padding repeats the row minimum so it never changes a row's min."""
    out = np.empty((len(table), k_max))
    for i, c in enumerate(table):
        out[i, : c.size] = c
        out[i, c.size :] = c.min()
    return out


def incumbent_fill(loss: np.ndarray, cost: np.ndarray, budget: float, choice: np.ndarray) -> np.ndarray:
    """Spend leftover budget on the largest loss reductions that still fit (at most 256 steps).

    A tighter incumbent makes the reduction below fix far more decisions. Not
    :func:`mpsearch.solvers.greedy.fill`: that one ranks upgrades by loss per unit cost and
    runs to the end; this one is a bounded O(n) pass, enough for a bound.
    """
    choice = choice.copy()
    arange = np.arange(loss.shape[0])
    for _ in range(min(loss.shape[0], 256)):  # a heuristic: bounded so it stays O(n) overall
        cur_loss, cur_cost = loss[arange, choice], cost[arange, choice]
        spare = budget - float(cur_cost.sum())
        gain = np.where(cost - cur_cost[:, None] <= spare, cur_loss[:, None] - loss, 0.0)
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[i, j] > 0:
            break
        choice[i] = j
    return choice


def lagrangian_reduction(loss: np.ndarray, cost: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Exactly discard options that cannot appear in any optimal plan (reduced-cost fixing).

    For a multiplier ``lam >= 0`` the Lagrangian ``LB = sum_i min_j(l_ij + lam c_ij) - lam B``
    bounds the optimum from below, and forcing option ``j`` of decision ``i`` raises the
    bound by its reduced cost ``rc_ij``. Any option with ``LB + rc_ij > UB`` (UB: a feasible
    plan's loss) is in no optimal plan. With ``lam`` near the LP dual most of a large
    instance is fixed, leaving HiGHS a small core (10,000 x 8 would otherwise take >10 s).

    Returns ``(keep mask, feasible incumbent plan, lower bound)``. Excluded entries have +inf loss.
    """
    n = loss.shape[0]
    arange = np.arange(n)

    def plan(lam: float) -> tuple[np.ndarray, float]:
        choice = np.argmin(loss + lam * cost, axis=1)
        return choice, float(cost[arange, choice].sum())

    lo, hi = 0.0, 1.0
    choice_hi, used = plan(hi)
    for _ in range(1000):  # find a multiplier whose plan is feasible (2**1000 stays finite)
        if used <= budget:
            break
        lo, hi = hi, hi * 2.0
        choice_hi, used = plan(hi)
    if used > budget:  # could not find one (pathological scaling): keep everything
        cheapest = np.argmin(np.where(np.isfinite(loss), cost, np.inf), axis=1)
        return np.isfinite(loss), cheapest, -math.inf
    for _ in range(100):  # bisect towards the LP dual, keeping the hi plan feasible
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        choice_mid, used = plan(mid)
        if used <= budget:
            hi, choice_hi = mid, choice_mid
        else:
            lo = mid

    choice_hi = incumbent_fill(loss, cost, budget, choice_hi)
    reduced = loss + hi * cost
    row_min = reduced.min(axis=1)
    lower = float(row_min.sum()) - hi * budget
    upper = float(loss[arange, choice_hi].sum())
    # Generous float margin: the sums above carry rounding error of order n * eps * magnitude.
    margin = 1e-9 * (float(np.abs(row_min).sum()) + hi * budget + abs(upper)) + 1e-12
    keep = (lower + (reduced - row_min[:, None])) <= upper + margin
    return keep, choice_hi, lower - margin
