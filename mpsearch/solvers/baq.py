"""BAQ-style closed-form bit allocation: reverse water-filling on a fitted 2^(-2b) loss model."""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import numpy as np

from ..core.registry import register
from .base import Allocator, Problem, Status, greedy_repair
from .greedy import fill, padded

_TWO_LN2 = 2.0 * math.log(2.0)


def fit_log_coef(loss: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Per row, ``ln c`` of the model ``loss = c 2^(-2 bits)``, least squares in log space
    over the options with a positive finite loss; ``-inf`` (c = 0) for rows with none.

    Kept in logs: with costs in bytes rather than bits ``c`` itself overflows.
    """
    positive = np.isfinite(loss) & (loss > 0)
    terms = np.where(positive, np.log(np.where(positive, loss, 1.0)) + _TWO_LN2 * np.where(positive, bits, 0.0), 0.0)
    count = positive.sum(axis=1)
    return np.where(count > 0, terms.sum(axis=1) / np.maximum(count, 1), -np.inf)


def water_fill(
    log_coef: np.ndarray, sizes: np.ndarray, lo: np.ndarray, hi: np.ndarray, budget: float
) -> tuple[np.ndarray, float]:
    """Minimise ``sum c_i 2^(-2 b_i)`` s.t. ``sizes @ b <= budget``, ``lo <= b <= hi``.

    KKT gives equal slopes: ``b_i = 0.5 log2(2 ln2 c_i / (lambda n_i))`` clipped to the
    bounds, so only the scalar ``lambda`` is unknown; the bits spent fall monotonically
    in it, so bisection (on ``t = log2 lambda``, to float resolution) finds it.
    Decisions with ``c_i = 0`` sit at ``lo``. Returns ``(b, lambda)``; ``lambda = 0``
    when the budget is not binding. ``b`` is taken on the feasible side of the bisection.
    """
    active = np.isfinite(log_coef)
    a = np.where(active, 0.5 * (log_coef + np.log(_TWO_LN2 / sizes)) / math.log(2.0), 0.0)

    def bits_at(t: float) -> np.ndarray:
        return np.where(active, np.clip(a - 0.5 * t, lo, hi), lo)

    top = np.where(active, hi, lo)
    if not active.any() or float(sizes @ top) <= budget:
        return top, 0.0
    t_lo = 2.0 * float(np.min((a - hi)[active]))  # every active decision at hi: over budget
    t_hi = 2.0 * float(np.max((a - lo)[active]))  # every decision at lo: min_budget
    for _ in range(200):
        mid = 0.5 * (t_lo + t_hi)
        if mid in (t_lo, t_hi):
            break
        if float(sizes @ bits_at(mid)) <= budget:
            t_hi = mid
        else:
            t_lo = mid
    with np.errstate(over="ignore"):  # inf only for costs far from bits (sizes not given)
        lam = float(np.exp2(t_hi))
    return bits_at(t_hi), lam


@register("solver", "baq")
class BAQ(Allocator):
    """Closed-form convex allocation (BAQ / classic reverse water-filling), then rounding.

    As in BAQ, at the continuous optimum every decision that is not at a bit
    bound has the same loss decrease per extra bit per weight (equal slope ``lambda``).
    Each decision's loss is modelled as ``c_i 2^(-2 b_i)``, with ``c_i`` fitted in log
    space to its options' (bits, loss) pairs; bits per weight of an option are
    ``cost / sizes[i]`` (``sizes``: number of weights per decision). With
    ``sizes=None`` every ``n_i`` is 1, i.e. costs are read directly as bits.

    The continuous plan is rounded down to the options (largest bits not above
    ``b_i``, which keeps the budget), then the leftover is spent with the true loss
    table by :func:`~mpsearch.solvers.greedy.fill`. A heuristic for the discrete
    problem: ``status_ == "optimal"`` means a plan within budget was found and
    ``loss_`` is an upper bound on the optimum.

    After a feasible solve: ``bits_continuous_`` (continuous ``b_i``), ``lambda_``
    (the equal slope, 0 if the budget is not binding) and ``log_coef_`` (``ln c_i``).
    """

    name = "baq"
    #: Not an exact solver: ``loss_`` only bounds the optimum from above.
    EXACT: ClassVar[bool] = False

    bits_continuous_: np.ndarray | None
    lambda_: float | None
    log_coef_: np.ndarray | None

    def __init__(self, *, sizes: Sequence[float] | None = None) -> None:
        self.sizes = sizes

    def solve(self, problem: Problem) -> "BAQ":
        """Clears the continuous-solution attributes (left None when infeasible), then solves."""
        self.bits_continuous_ = self.lambda_ = self.log_coef_ = None
        super().solve(problem)
        return self

    def _n(self, problem: Problem) -> np.ndarray:
        """Weights per decision; 1 each without ``sizes``."""
        if self.sizes is None:
            return np.ones(problem.n_decisions)
        n = np.asarray(self.sizes, dtype=np.float64).reshape(-1)
        if n.size != problem.n_decisions or not np.all(np.isfinite(n) & (n > 0)):
            raise ValueError(
                f"sizes must hold one positive finite weight count per decision "
                f"({problem.n_decisions}), got {n.size} values (min {n.min() if n.size else None})"
            )
        return n

    def _solve(self, problem: Problem) -> tuple[str, Sequence[int] | None]:
        """Called by ``solve`` for feasible problems: fit, water-fill, round down, repair."""
        n = self._n(problem)
        loss, cost = padded(problem)
        bits = cost / n[:, None]  # padding stays +inf
        lo = bits.min(axis=1)
        hi = np.where(np.isfinite(bits), bits, -np.inf).max(axis=1)
        self.log_coef_ = fit_log_coef(loss, bits)
        b, self.lambda_ = water_fill(self.log_coef_, n, lo, hi, problem.effective_budget)
        self.bits_continuous_ = b

        # Round down: largest bits not above b_i (ties: lowest loss, then index).
        ok = bits <= (b + 1e-12 * np.maximum(1.0, np.abs(b)))[:, None]
        none = ~ok.any(axis=1)  # only by float noise (b >= lo): take the cheapest bits
        ok[none] = bits[none] == lo[none, None]
        top = np.where(ok, bits, -np.inf).max(axis=1)
        plan = np.argmin(np.where(ok & (bits == top[:, None]), loss, np.inf), axis=1)

        result = fill(problem, plan)
        if not problem.fits(problem.evaluate(result)[1]):  # rounding can only overshoot by float noise
            result = greedy_repair(problem, result)
        self.solver_status_ = f"heuristic: lambda={self.lambda_:.6g}; loss_ is an upper bound on the optimum"
        return Status.OPTIMAL, result
