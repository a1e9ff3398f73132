"""The exact allocator: a MILP on HiGHS (exact up to a set gap), after an exact presolve (:mod:`.presolve`)."""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from ..core.registry import register
from .base import REL_TOL, Allocator, Problem, SolverError, Status, greedy_repair
from .presolve import lagrangian_reduction, padded_rows

# HiGHS defaults (feasibility 1e-6/1e-7) are too loose to keep the budget within
# 1e-9 or to match brute force; 1e-10 is HiGHS's minimum. With the budget row
# scaled to a right-hand side of 1 this is a relative tolerance, inside
# Problem.fits' 1e-9. The dual tolerance matters too: at the default 1e-7 the
# branch-and-bound prunes on reduced costs good to only 1e-7. HiGHS also drops
# matrix entries below small_matrix_value (default 1e-9), which over thousands of
# tiny costs adds up to a real budget overshoot; 1e-12 is its minimum, and steps
# below it are rounded up to it (conservative) before the model is built.
_SMALL_MATRIX_VALUE = 1e-12
_HIGHS_TOLERANCES = {
    "primal_feasibility_tolerance": 1e-10,
    "mip_feasibility_tolerance": 1e-10,
    "dual_feasibility_tolerance": 1e-10,
    "small_matrix_value": _SMALL_MATRIX_VALUE,
}


def _unconstrained_optimum(problem: Problem) -> tuple[int, ...]:
    """Per decision the min-loss option, ties to the cheapest then lowest index."""
    choice = []
    for loss, cost in zip(problem.loss, problem.cost):
        best = np.flatnonzero(loss == loss.min())
        choice.append(int(best[np.argmin(cost[best])]))
    return tuple(choice)


def _scaled_arrays(problem: Problem) -> tuple[np.ndarray, np.ndarray, float]:
    """Padded (decision x option) ``loss``, ``cost`` and the budget, shifted and scaled.

    Excluded entries (padding, and options that cannot fit even with every other
    decision at its cheapest) get +inf loss and the row's min cost, so they are
    never picked and never change a row minimum. Losses are shifted to a per-decision
    minimum of 0 (same argmin) and scaled to at most 1; costs are divided by the
    budget, which every surviving cost is now below, so they lie in [0, 1].
    """
    k_max = max(len(o) for o in problem.options)
    loss = np.full((problem.n_decisions, k_max), np.inf)
    cost = np.empty((problem.n_decisions, k_max))
    for i, (l, c) in enumerate(zip(problem.loss, problem.cost)):
        loss[i, : l.size] = l - l.min()
        cost[i, : c.size] = c
        cost[i, c.size :] = c.min()
    effective = problem.effective_budget
    spare = effective - problem.min_budget + 1e-9 * abs(effective)
    row_min = cost.min(axis=1, keepdims=True)
    excluded = cost - row_min > spare
    loss[excluded] = np.inf
    cost = np.where(excluded, row_min, cost)
    loss /= float(loss[np.isfinite(loss)].max()) or 1.0
    cost /= effective if effective > 0 else 1.0
    # Never below the scaled all-cheapest plan, which rounding could otherwise push over.
    budget = max(effective / (effective if effective > 0 else 1.0), float(cost.min(axis=1).sum()))
    return loss, cost, budget


@register("solver", "milp")
class MILP(Allocator):
    """Multiple-choice knapsack as a binary program, solved by HiGHS (highspy, built directly).

    Steps: (1) a Lagrangian bound plus a greedy plan discards options that cannot
    be optimal and fixes most decisions (exact reduced-cost fixing); (2) the
    remaining core goes to HiGHS as one flat boolean vector with a sparse one-hot
    row per decision and one budget row.

    ``gap`` is the optimality tolerance: with status ``optimal``, ``loss_`` is at
    most ``gap * D`` above the true optimum, where ``D`` is the part of the loss
    the budget controls (plan loss minus the sum of per-decision minimum losses)
    of the greedy starting plan. The default ``gap=0`` asks for a proof of exact
    optimality: instant for model-sized problems (hundreds of decisions), but on
    10,000 x 8 instances with many near-equal combinations (integer bit costs) it
    can take HiGHS minutes; ``gap=1e-5`` keeps those at seconds.
    ``time_limit`` (seconds, HiGHS only) returns the best plan found so far with
    status ``optimal_inaccurate``.

    Extra ``problem.constraints`` become further rows of the same program. The
    reduction in step (1) is then skipped (its bound covers one budget row), so
    every decision goes to HiGHS; fine for model-sized problems.
    """

    name = "milp"
    supports_constraints = True

    def __init__(self, *, time_limit: float | None = None, verbose: bool = False, gap: float = 0.0) -> None:
        self.time_limit = time_limit
        self.verbose = verbose
        self.gap = gap

    @classmethod
    def is_available(cls) -> bool:
        """Called before use: True iff HiGHS's Python interface (highspy) is importable."""
        try:
            import highspy  # noqa: F401
        except ImportError:
            return False
        return True

    def _solve(self, problem: Problem) -> tuple[str, Sequence[int] | None]:
        """Called by ``solve`` for feasible problems: reduce, then solve the core with HiGHS."""
        # A budget covering the unconstrained optimum makes the solver pointless.
        unconstrained = _unconstrained_optimum(problem)
        if problem.evaluate(unconstrained)[1] <= problem.effective_budget and problem.feasible(unconstrained):
            self.solver_status_ = "skipped: budget not binding"
            return Status.OPTIMAL, unconstrained

        loss, cost, budget = _scaled_arrays(problem)
        if problem.constraints:
            return self._solve_constrained(problem, loss, cost, budget)
        keep, incumbent, lower = lagrangian_reduction(loss, cost, budget)
        upper = float(loss[np.arange(problem.n_decisions), incumbent].sum())
        tolerance = max(self.gap, 0.0) * upper  # absolute, in scaled loss units
        core = np.flatnonzero(keep.sum(axis=1) > 1)
        if core.size == 0 or upper - lower <= tolerance:
            self.solver_status_ = "skipped: greedy plan within gap of the Lagrangian bound"
            return Status.OPTIMAL, tuple(int(j) for j in incumbent)

        status, plan = self._solve_core(loss, [(cost, budget)], keep, incumbent, core, tolerance)
        fitting = [tuple(int(j) for j in p) for p in (plan, incumbent) if p is not None]
        fitting = [p for p in fitting if problem.fits(problem.evaluate(p)[1])]
        if status == Status.OPTIMAL and plan is not None and fitting and fitting[0] == tuple(plan):
            return Status.OPTIMAL, fitting[0]
        # Time limit, numerical trouble, or an over-budget HiGHS plan: best feasible plan at hand.
        if not fitting:  # should essentially never happen
            return Status.INACCURATE, greedy_repair(problem, incumbent)
        return Status.INACCURATE, min(fitting, key=lambda p: problem.evaluate(p)[0])

    def _solve_constrained(
        self, problem: Problem, loss: np.ndarray, cost: np.ndarray, budget: float
    ) -> tuple[str, Sequence[int] | None]:
        """Budget row plus one row per extra constraint, every decision handed to HiGHS."""
        rows = [(cost, budget)]
        for con in problem.constraints:
            table = padded_rows(con.cost, loss.shape[1])
            row_min = table.min(axis=1, keepdims=True)
            spare = con.limit - float(row_min.sum()) + REL_TOL * abs(con.limit)
            loss = np.where(table - row_min > spare, np.inf, loss)  # cannot fit even alone
            scale = abs(con.limit) if abs(con.limit) > 1e-200 else 1.0
            rows.append((table / scale, con.limit / scale))
        keep = np.isfinite(loss)
        if not keep.any(axis=1).all():
            return Status.INFEASIBLE, None
        incumbent = np.argmin(loss, axis=1)  # the only candidate of every fixed decision
        core = np.flatnonzero(keep.sum(axis=1) > 1)
        if core.size == 0:
            return (
                (Status.OPTIMAL, tuple(int(j) for j in incumbent))
                if problem.feasible(incumbent)
                else (Status.INFEASIBLE, None)
            )
        status, plan = self._solve_core(loss, rows, keep, incumbent, core, 0.0)
        if plan is None:  # infeasible, or a time limit before any feasible plan
            return (Status.INFEASIBLE if status == Status.INFEASIBLE else Status.ERROR), None
        plan = tuple(int(j) for j in plan)
        if not problem.feasible(plan):  # beyond HiGHS's 1e-10 tolerances: should not happen
            totals = problem.constraint_totals(plan)
            raise SolverError(
                f"HiGHS returned a plan outside the constraints (cost {problem.evaluate(plan)[1]}, totals {totals}); "
                "try verbose=True, or check the cost tables for extreme ranges"
            )
        return status, plan

    def _solve_core(
        self,
        loss: np.ndarray,
        rows_in: list[tuple[np.ndarray, float]],
        keep: np.ndarray,
        incumbent: np.ndarray,
        core: np.ndarray,
        tolerance: float,
    ) -> tuple[str, np.ndarray | None]:
        """HiGHS on the undecided ``core``; the other decisions keep their only candidate.

        ``rows_in`` holds ``(cost table, limit)`` per constraint row, the budget first.
        Returns ``(status, plan)``; ``plan`` is a full plan (or None) not yet checked
        against the budget. On a time limit it is HiGHS's best incumbent, if any.
        """
        fixed = np.ones(loss.shape[0], dtype=bool)
        fixed[core] = False
        rows, cols = np.nonzero(keep[core])  # rows index into core, sorted
        n_vars = rows.size
        # One-hot rows (== 1), then one row per constraint (<= its spare).
        one_hot = sp.csr_matrix((np.ones(n_vars), (rows, np.arange(n_vars))), shape=(core.size, n_vars))
        blocks, upper = [one_hot], [np.ones(core.size)]
        for cost, limit in rows_in:
            # Each row over cost increments above each core decision's cheapest candidate,
            # rescaled to a right-hand side of 1 so HiGHS's tolerance is relative to it.
            base = np.where(keep[core], cost[core], np.inf).min(axis=1)
            spare = limit - float(cost[fixed, incumbent[fixed]].sum()) - float(base.sum())
            if spare < -1e-9 * max(abs(limit), 1.0):  # the fixed decisions alone break this row
                return Status.INFEASIBLE, None
            # A spare of float noise (a plan exactly at the limit) must not blow the row up.
            scale = spare if spare > 1e-9 * max(abs(limit), 1e-300) else 1.0
            step = (cost[core[rows], cols] - base[rows]) / scale
            step[(step > 0) & (step < _SMALL_MATRIX_VALUE)] = _SMALL_MATRIX_VALUE
            blocks.append(sp.csr_matrix(step[None, :]))
            upper.append([max(spare, 0.0) / scale])
        matrix = sp.vstack(blocks, format="csr")
        upper = np.concatenate(upper)
        lower = np.concatenate([np.ones(core.size), np.full(len(rows_in), -np.inf)])
        opts: dict[str, Any] = dict(_HIGHS_TOLERANCES, mip_rel_gap=max(self.gap, 0.0), mip_abs_gap=tolerance)
        if self.time_limit is not None:
            opts["time_limit"] = float(self.time_limit)
        status, values = _run_highs(loss[core[rows], cols], matrix, lower, upper, opts, self.verbose)
        self.solver_status_ = status
        if status == "infeasible":
            return Status.INFEASIBLE, None
        if values is None:
            if status not in ("time limit reached", "optimal"):
                raise SolverError(
                    f"HiGHS ended with '{status}' on a core of {core.size} of {loss.shape[0]} decisions "
                    f"({n_vars} candidate options). Try verbose=True to see the HiGHS log, a time_limit, "
                    "a larger gap, or check the loss/cost ranges for extreme values."
                )
            return Status.INACCURATE, None
        # Round: per core decision, the candidate with the largest value.
        order = np.lexsort((-values, rows))
        firsts = order[np.r_[0, np.flatnonzero(np.diff(rows[order])) + 1]]
        plan = incumbent.copy()
        plan[core] = cols[firsts]
        return (Status.OPTIMAL if status == "optimal" else Status.INACCURATE), plan


def _run_highs(
    objective: np.ndarray,
    matrix: sp.csr_matrix,
    lower: np.ndarray,
    upper: np.ndarray,
    options: dict[str, Any],
    verbose: bool,
) -> tuple[str, np.ndarray | None]:
    """A binary program ``min objective @ x, lower <= matrix @ x <= upper`` handed to HiGHS directly.

    Returns HiGHS's model status in words and the best feasible ``x`` it has (None if none).
    Building the model by hand rather than through cvxpy saves its compile step, which
    dominates on model-sized problems (tens of milliseconds per solve).
    """
    import highspy

    h = _new_highs(verbose)
    for key, value in options.items():
        h.setOptionValue(key, value)
    n = objective.size
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, matrix.shape[0]
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = objective.astype(np.float64), np.zeros(n), np.ones(n)
    lp.row_lower_, lp.row_upper_ = lower.astype(np.float64), upper.astype(np.float64)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n, matrix.shape[0]
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = matrix.indptr, matrix.indices, matrix.data
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n
    h.passModel(lp)
    h.run()
    status = h.modelStatusToString(h.getModelStatus()).lower()
    has_plan = h.getInfo().primal_solution_status == 2  # kSolutionStatusFeasible
    values = np.asarray(h.getSolution().col_value, dtype=float) if has_plan else None
    return status, values


def _new_highs(verbose: bool):
    """A HiGHS instance; unless ``verbose``, its once-per-process banner (printed by the
    C++ constructor straight to file descriptor 1) does not reach stdout."""
    import ctypes

    import highspy

    if verbose:
        return highspy.Highs()
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        h = highspy.Highs()
        ctypes.CDLL(None).fflush(None)  # C stdio buffers go to /dev/null, not to the restored stdout
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    h.setOptionValue("output_flag", False)
    return h
