"""Exact solvers: a MILP via cvxpy + HiGHS, and brute force as a reference for tests."""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from ..registry import register
from .base import Allocator, Problem, SolverError, Status, greedy_repair

# HiGHS defaults (mip_rel_gap=1e-4, feasibility 1e-6) are too loose to match
# brute force to 1e-6 or to keep the budget within 1e-9. With costs scaled by
# the budget, a 1e-10 feasibility tolerance (HiGHS's minimum) means a plan may
# overshoot the budget by ~1e-10 relative, inside Problem.fits' 1e-9. After the
# Lagrangian reduction the core is small, so the tight gaps cost little time.
_HIGHS_OPTIONS = {
    "mip_rel_gap": 1e-9,
    "mip_abs_gap": 1e-9,
    "primal_feasibility_tolerance": 1e-10,
    "mip_feasibility_tolerance": 1e-10,
    "dual_feasibility_tolerance": 1e-10,  # else B&B prunes on reduced costs good to only 1e-7
}


def _unconstrained_optimum(problem: Problem) -> tuple[int, ...]:
    """Per decision the min-loss option, ties to the cheapest then lowest index."""
    choice = []
    for loss, cost in zip(problem.loss, problem.cost):
        best = np.flatnonzero(loss == loss.min())
        choice.append(int(best[np.argmin(cost[best])]))
    return tuple(choice)


@register("solver", "milp")
class MILP(Allocator):
    """Exact multiple-choice knapsack as a binary program, solved by HiGHS through cvxpy.

    One flat boolean vector holds every (decision, option) pair; a sparse
    one-hot row per decision and a single budget row keep model building linear
    in size (10,000 x 8 builds and solves in seconds).
    """

    name = "milp"

    def __init__(self, *, time_limit: float | None = None, verbose: bool = False) -> None:
        self.time_limit = time_limit
        self.verbose = verbose

    @classmethod
    def is_available(cls) -> bool:
        """Called before use: True iff cvxpy is importable and lists HiGHS."""
        try:
            import cvxpy as cp
        except ImportError:
            return False
        return "HIGHS" in cp.installed_solvers()

    def _solve(self, problem: Problem) -> tuple[str, Sequence[int] | None]:
        """Called by ``solve`` for feasible problems; builds the scaled MILP and solves it."""
        # A budget covering the unconstrained optimum makes the solver pointless.
        unconstrained = _unconstrained_optimum(problem)
        if problem.evaluate(unconstrained)[1] <= problem.effective_budget:
            self.solver_status_ = "skipped: budget not binding"
            return Status.OPTIMAL, unconstrained

        import cvxpy as cp

        # Padded (decision x option) arrays. Excluded entries (padding, or options that
        # cannot fit even with every other decision at its cheapest) get +inf loss and the
        # row's min cost, so they are never picked and never change a row minimum.
        k_max = max(len(o) for o in problem.options)
        loss = np.full((problem.n_decisions, k_max), np.inf)
        cost = np.empty((problem.n_decisions, k_max))
        for i, (l, c) in enumerate(zip(problem.loss, problem.cost)):
            loss[i, : l.size] = l - l.min()  # per-decision shift: same argmin, objective >= 0
            cost[i, : c.size] = c
            cost[i, c.size :] = c.min()
        effective = problem.effective_budget
        spare = effective - problem.min_budget + 1e-9 * abs(effective)
        row_min = cost.min(axis=1, keepdims=True)
        excluded = cost - row_min > spare
        loss[excluded] = np.inf
        cost = np.where(excluded, row_min, cost)
        # Every surviving cost is now <= the budget, so dividing by the budget puts costs in
        # [0, 1] and makes HiGHS's absolute feasibility tolerance a relative one; losses are
        # scaled to O(1) for the same reason.
        cost_scale = effective if effective > 0 else 1.0
        loss_scale = float(loss[np.isfinite(loss)].max()) or 1.0
        loss /= loss_scale
        cost /= cost_scale
        # Never below the scaled all-cheapest plan, which rounding could otherwise push over.
        budget = max(effective / cost_scale, float(cost.min(axis=1).sum()))

        keep, incumbent = _lagrangian_reduction(loss, cost, budget)
        # Decisions left with one candidate are fixed; only the rest (the "core") go to HiGHS.
        core = np.flatnonzero(keep.sum(axis=1) > 1)
        if core.size == 0:  # every decision fixed: the incumbent is optimal
            self.solver_status_ = "skipped: fixed by Lagrangian reduction"
            return Status.OPTIMAL, tuple(int(j) for j in incumbent)
        fixed = np.ones(problem.n_decisions, dtype=bool)
        fixed[core] = False
        core_budget = budget - float(cost[np.flatnonzero(fixed), incumbent[fixed]].sum())
        rows, cols = np.nonzero(keep[core])  # rows index into core, sorted
        n_vars = rows.size
        one_hot = sp.csr_matrix((np.ones(n_vars), (rows, np.arange(n_vars))), shape=(core.size, n_vars))
        x = cp.Variable(n_vars, boolean=True)
        model = cp.Problem(
            cp.Minimize(loss[core[rows], cols] @ x),
            [one_hot @ x == 1, cost[core[rows], cols] @ x <= core_budget],
        )
        opts = dict(_HIGHS_OPTIONS)
        if self.time_limit is not None:
            opts["time_limit"] = float(self.time_limit)
        try:
            with warnings.catch_warnings():  # inaccuracy is reported through status_ instead
                warnings.filterwarnings("ignore", message="Solution may be inaccurate", category=UserWarning)
                model.solve(solver=cp.HIGHS, verbose=self.verbose, **opts)
        except cp.error.SolverError as exc:
            raise SolverError(
                f"HiGHS failed on a core of {core.size} of {problem.n_decisions} decisions "
                f"({n_vars} candidate options): {exc}. "
                "Try verbose=True to see the HiGHS log, a larger time_limit, "
                "or check the loss/cost ranges for extreme values."
            ) from exc

        self.solver_status_ = str(model.status)
        if model.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or x.value is None:
            # Time limit (cvxpy reports no incumbent then) or numerical trouble: the problem is
            # known feasible, so return the feasible greedy plan, flagged as not proven optimal.
            return Status.INACCURATE, tuple(int(j) for j in incumbent)

        # Round: per decision, the candidate with the largest value (rows are sorted).
        order = np.lexsort((-np.asarray(x.value), rows))
        firsts = order[np.r_[0, np.flatnonzero(np.diff(rows[order])) + 1]]
        plan = incumbent.copy()
        plan[core] = cols[firsts]
        choice = tuple(int(j) for j in plan)
        status = Status.OPTIMAL if model.status == cp.OPTIMAL else Status.INACCURATE
        if not problem.fits(problem.evaluate(choice)[1]):
            # Scaled tolerances let an over-budget plan through; should essentially never happen.
            return Status.INACCURATE, greedy_repair(problem, choice)
        return status, choice


def _greedy_fill(loss: np.ndarray, cost: np.ndarray, budget: float, choice: np.ndarray) -> np.ndarray:
    """Spend leftover budget on the largest loss reductions that still fit.

    A tighter incumbent makes the reduction below fix far more decisions.
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


def _lagrangian_reduction(loss: np.ndarray, cost: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """Exactly discard options that cannot appear in any optimal plan (reduced-cost fixing).

    For a multiplier ``lam >= 0`` the Lagrangian ``LB = sum_i min_j(l_ij + lam c_ij) - lam B``
    bounds the optimum from below, and forcing option ``j`` of decision ``i`` raises the
    bound by its reduced cost ``rc_ij``. Any option with ``LB + rc_ij > UB`` (UB: a feasible
    plan's loss) is in no optimal plan. With ``lam`` near the LP dual most of a large
    instance is fixed, leaving HiGHS a small core (10,000 x 8 would otherwise take >10 s).

    Returns ``(keep mask, feasible incumbent plan)``. Excluded entries have +inf loss.
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
        return np.isfinite(loss), cheapest
    for _ in range(100):  # bisect towards the LP dual, keeping the hi plan feasible
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        choice_mid, used = plan(mid)
        if used <= budget:
            hi, choice_hi = mid, choice_mid
        else:
            lo = mid

    choice_hi = _greedy_fill(loss, cost, budget, choice_hi)
    reduced = loss + hi * cost
    row_min = reduced.min(axis=1)
    lower = float(row_min.sum()) - hi * budget
    upper = float(loss[arange, choice_hi].sum())
    # Generous float margin: the sums above carry rounding error of order n * eps * magnitude.
    margin = 1e-9 * (float(np.abs(row_min).sum()) + hi * budget + abs(upper)) + 1e-12
    keep = (lower + (reduced - row_min[:, None])) <= upper + margin
    return keep, choice_hi


@register("solver", "brute")
class BruteForce(Allocator):
    """Exhaustive enumeration: the ground truth for tests on tiny instances.

    Ties go to the lowest loss, then lowest cost, then the lexicographically
    smallest choice, so results are deterministic.
    """

    name = "brute"
    MAX_PLANS = 2_000_000

    def __init__(self) -> None:
        pass

    def _solve(self, problem: Problem) -> tuple[str, Sequence[int] | None]:
        """Called by ``solve`` for feasible problems; enumerates every plan."""
        sizes = [len(o) for o in problem.options]
        n_plans = math.prod(sizes)
        if n_plans > self.MAX_PLANS:
            raise ValueError(
                f"brute force would enumerate {n_plans:,} plans (limit {self.MAX_PLANS:,}); use 'milp'"
            )
        budget = problem.effective_budget
        best: tuple[float, float] | None = None
        best_choice: tuple[int, ...] | None = None
        # product() yields plans in lexicographic order, so a strict '<' keeps the smallest on ties.
        for choice in itertools.product(*(range(k) for k in sizes)):
            loss, cost = problem.evaluate(choice)
            if cost <= budget and (best is None or (loss, cost) < best):
                best, best_choice = (loss, cost), choice
        if best_choice is None:  # unreachable: the all-cheapest plan costs exactly min_budget
            return Status.ERROR, None
        return Status.OPTIMAL, best_choice
