"""The whole Pareto front of (predicted loss, cost) in one call: a Lagrangian sweep.

Minimising ``loss + lam * cost`` separates per decision, so sweeping ``lam`` from
infinity to 0 walks the lower convex hull of all plans. Exactly: the hull of the sum
is the Minkowski sum of each decision's own lower convex hull, whose vertices are
reached by taking every decision's hull segments in order of slope (steepest loss
drop per unit cost first). Every point of the front is a real plan that is optimal
for its own cost; budgets between hull points need the MILP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..core.registry import register
from .base import Allocator, Problem, Status


def decision_hull(loss: np.ndarray, cost: np.ndarray) -> list[int]:
    """Option indices on one decision's lower convex hull, cheapest first.

    Dominated options (not cheaper and not better) are dropped, then the monotone
    chain keeps only the convex corners.
    """
    order = sorted(range(len(cost)), key=lambda j: (cost[j], loss[j], j))
    efficient: list[int] = []
    for j in order:  # strictly decreasing loss as cost grows
        if not efficient or loss[j] < loss[efficient[-1]]:
            if efficient and cost[j] == cost[efficient[-1]]:
                continue
            efficient.append(j)
    hull: list[int] = []
    for j in efficient:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is not a convex corner if it lies on or above the segment a -> j
            if (loss[b] - loss[a]) * (cost[j] - cost[a]) >= (loss[j] - loss[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


@dataclass
class Front:
    """The lower convex hull of a problem's plans.

    Point ``k`` is the cheapest plan after the first ``k`` upgrade steps;
    ``costs[k]``/``losses[k]`` are its totals, :meth:`choice` rebuilds its plan.
    """

    costs: np.ndarray
    losses: np.ndarray
    start: tuple[int, ...]
    steps: list[tuple[int, int]]  # (decision, new option) in slope order

    def __len__(self) -> int:
        return len(self.costs)

    def choice(self, k: int) -> tuple[int, ...]:
        plan = list(self.start)
        for i, j in self.steps[:k]:
            plan[i] = j
        return tuple(plan)

    def best_within(self, budget: float) -> int | None:
        """Index of the lowest-loss front point with cost <= ``budget`` (``None`` if none)."""
        k = int(np.searchsorted(self.costs, budget, side="right")) - 1
        return k if k >= 0 else None


def pareto_front(problem: Problem) -> Front:
    """Every vertex of the lower convex hull of (cost, loss), cheapest first."""
    start, seg_slope, seg_dc, seg_dl, seg_move = [], [], [], [], []
    for i, (loss, cost) in enumerate(zip(problem.loss, problem.cost)):
        hull = decision_hull(loss, cost)
        start.append(hull[0])
        for a, b in zip(hull, hull[1:]):
            dc, dl = float(cost[b] - cost[a]), float(loss[b] - loss[a])
            seg_slope.append(dl / dc)
            seg_dc.append(dc)
            seg_dl.append(dl)
            seg_move.append((i, b))
    # slopes within a decision increase along its hull, so a stable sort keeps them in order
    order = np.argsort(np.asarray(seg_slope), kind="stable")
    base_cost = float(sum(float(c[j]) for c, j in zip(problem.cost, start)))
    base_loss = float(sum(float(l[j]) for l, j in zip(problem.loss, start)))
    costs = base_cost + np.concatenate([[0.0], np.cumsum(np.asarray(seg_dc)[order])])
    losses = base_loss + np.concatenate([[0.0], np.cumsum(np.asarray(seg_dl)[order])])
    return Front(costs, losses, tuple(start), [seg_move[k] for k in order])


@register("solver", "lagrangian")
class Lagrangian(Allocator):
    """The best Pareto-front plan within the budget.

    A heuristic for budgets between hull points (its ``loss_`` is an upper bound on
    the optimum; the MILP closes the gap), exact at the hull points themselves, and
    fast: 10,000 decisions x 8 options in well under a second. ``front_`` keeps the
    whole front for reports.
    """

    name = "lagrangian"

    def __init__(self) -> None:
        pass

    def _solve(self, problem: Problem) -> tuple[str, Sequence[int] | None]:
        self.front_ = pareto_front(problem)
        k = self.front_.best_within(problem.effective_budget) or 0
        # the front's costs are running sums; step back if float noise put a plan over budget
        while k > 0 and not problem.fits(problem.evaluate(self.front_.choice(k))[1]):
            k -= 1
        return Status.OPTIMAL, self.front_.choice(k)
