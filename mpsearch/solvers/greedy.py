"""Greedy marginal-ratio allocator (AIMET AMP style): a fast heuristic baseline.

Also holds the two helpers the BAQ allocator reuses: padding the ragged option
tables into matrices, and the "spend the leftover budget" upgrade step.
"""

from __future__ import annotations

import heapq
from typing import ClassVar, Sequence

import numpy as np

from ..core.registry import register
from .base import Allocator, Problem, Status, greedy_repair


def padded(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """``(loss, cost)`` as (decision x max options) matrices; padding is +inf in both,
    so a padded slot is never cheaper, never better, and never picked."""
    k_max = max(len(o) for o in problem.options)
    loss = np.full((problem.n_decisions, k_max), np.inf)
    cost = np.full((problem.n_decisions, k_max), np.inf)
    for i, (l, c) in enumerate(zip(problem.loss, problem.cost)):
        loss[i, : l.size] = l
        cost[i, : c.size] = c
    return loss, cost


def _upgrades(loss: np.ndarray, cost: np.ndarray, cur: int, i: int) -> list[tuple[float, int, int, int]]:
    """Heap entries ``(-ratio, i, j, cur)`` for every strictly costlier, strictly better option ``j``
    of row ``i``, currently at option ``cur``."""
    js = np.flatnonzero((loss < loss[cur]) & (cost > cost[cur]))
    ratio = (loss[cur] - loss[js]) / (cost[js] - cost[cur])
    return [(-float(r), i, int(j), cur) for r, j in zip(ratio, js)]


def fill(problem: Problem, choice: Sequence[int]) -> tuple[int, ...]:
    """Spend leftover budget: repeatedly take the upgrade that fits with the largest
    loss decrease per unit of extra cost (ties: lowest decision, then option index).

    First every decision moves to its lowest-loss option costing no more than the
    current one (free improvements), so every remaining upgrade costs extra; the
    leftover budget then only shrinks, and an upgrade that does not fit now never
    will, so one lazy heap over all candidates suffices: O(N K log(N K)).
    A plan over budget is returned unchanged (nothing fits).
    """
    loss, cost = padded(problem)
    plan = np.asarray(choice, dtype=np.int64).copy()
    rows = np.arange(problem.n_decisions)
    # Free improvements: min loss among options no costlier than the current one (ties: cheapest).
    allowed = cost <= cost[rows, plan][:, None]
    key = np.where(allowed, loss, np.inf)
    best = key == key.min(axis=1, keepdims=True)
    plan = np.argmin(np.where(best & allowed, cost, np.inf), axis=1)

    budget = problem.effective_budget
    total = float(cost[rows, plan].sum())
    heap = [e for i in range(problem.n_decisions) for e in _upgrades(loss[i], cost[i], int(plan[i]), i)]
    heapq.heapify(heap)
    while heap:
        _, i, j, cur = heapq.heappop(heap)
        if plan[i] != cur:
            continue  # stale: decision i moved (loss only falls, so it never comes back)
        extra = float(cost[i, j] - cost[i, cur])
        if total + extra > budget:
            continue  # leftover only shrinks, so it never fits later either
        plan[i] = j
        total += extra
        for entry in _upgrades(loss[i], cost[i], j, i):
            heapq.heappush(heap, entry)
    return tuple(int(j) for j in plan)


def _efficient_set(loss: np.ndarray, cost: np.ndarray) -> list[int]:
    """Option indices on the lower convex hull of (cost, loss), cheapest first, loss strictly
    falling; ends at the min-loss option. Collinear points are kept (finer downgrade steps)."""
    hull: list[int] = []
    for j in sorted(range(loss.size), key=lambda j: (cost[j], loss[j], j)):
        if hull and loss[j] >= loss[hull[-1]]:
            continue  # dominated: no cheaper and no better than the last hull point
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]  # pop b if strictly above segment a -> j
            if (loss[b] - loss[a]) * (cost[j] - cost[a]) > (loss[j] - loss[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


@register("solver", "greedy")
class Greedy(Allocator):
    """Marginal-ratio greedy, as in AIMET's AMP: a heuristic, not an optimiser.

    Every decision starts at the top of its efficient set (its min-loss option,
    ties to the cheapest); while over budget, take the single downgrade with the
    smallest loss increase per unit of cost saved; then :func:`fill` spends any
    leftover on the best-ratio upgrades that fit. On the convex hull each
    decision's next downgrade ratio only grows, so a heap finds the global best
    step in O(log N).

    ``status_ == "optimal"`` here means "a plan within budget was found": the
    plan is optimal when the budget is not binding, and otherwise ``loss_`` is
    an upper bound on the true optimum (use ``milp`` for a proof).
    """

    name = "greedy"
    #: Not an exact solver: ``loss_`` only bounds the optimum from above.
    EXACT: ClassVar[bool] = False

    def __init__(self, *, fill: bool = True) -> None:
        self.fill = fill

    def _solve(self, problem: Problem) -> tuple[str, Sequence[int] | None]:
        """Called by ``solve`` for feasible problems: downgrade along hulls, then fill."""
        hulls = [_efficient_set(l, c) for l, c in zip(problem.loss, problem.cost)]
        pos = [len(h) - 1 for h in hulls]  # index into each hull; start at its top
        total = float(sum(c[h[-1]] for c, h in zip(problem.cost, hulls)))
        budget = problem.effective_budget

        def step(i: int) -> tuple[float, float, int]:
            """Heap key of decision i's next downgrade: (ratio, -saving, i)."""
            h, k = hulls[i], pos[i]
            l, c = problem.loss[i], problem.cost[i]
            saving = float(c[h[k]] - c[h[k - 1]])
            return float(l[h[k - 1]] - l[h[k]]) / saving, -saving, i

        heap = [step(i) for i in range(problem.n_decisions) if pos[i] > 0]
        heapq.heapify(heap)
        while total > budget and heap:
            _, neg_saving, i = heapq.heappop(heap)
            pos[i] -= 1
            total += neg_saving
            if pos[i] > 0:
                heapq.heappush(heap, step(i))

        plan: tuple[int, ...] = tuple(h[k] for h, k in zip(hulls, pos))
        if self.fill:
            plan = fill(problem, plan)
        if not problem.fits(problem.evaluate(plan)[1]):  # float drift in the running total only
            plan = greedy_repair(problem, plan)
        self.solver_status_ = "heuristic: loss_ is an upper bound on the optimum"
        return Status.OPTIMAL, plan
