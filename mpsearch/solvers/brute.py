"""Brute force: every plan enumerated, the reference the other solvers are checked against in tests."""

from __future__ import annotations

import itertools
import math
from typing import Sequence

from ..core.registry import register
from .base import Allocator, Problem, Status


@register("solver", "brute")
class BruteForce(Allocator):
    """Exhaustive enumeration: the ground truth for tests on tiny instances.

    Ties go to the lowest loss, then lowest cost, then the lexicographically
    smallest choice, so results are deterministic.
    """

    name = "brute"
    supports_constraints = True
    MAX_PLANS = 2_000_000

    def __init__(self) -> None:
        pass

    def _solve(self, problem: Problem) -> tuple[str, Sequence[int] | None]:
        """Called by ``solve`` for feasible problems; enumerates every plan."""
        sizes = [len(o) for o in problem.options]
        n_plans = math.prod(sizes)
        if n_plans > self.MAX_PLANS:
            raise ValueError(f"brute force would enumerate {n_plans:,} plans (limit {self.MAX_PLANS:,}); use 'milp'")
        budget = problem.effective_budget
        best: tuple[float, float] | None = None
        best_choice: tuple[int, ...] | None = None
        # product() yields plans in lexicographic order, so a strict '<' keeps the smallest on ties.
        for choice in itertools.product(*(range(k) for k in sizes)):
            loss, cost = problem.evaluate(choice)
            if (
                cost <= budget
                and (best is None or (loss, cost) < best)
                and (not problem.constraints or problem.feasible(choice))
            ):
                best, best_choice = (loss, cost), choice
        if best_choice is None:  # only with extra constraints: the all-cheapest plan fits the budget alone
            return Status.INFEASIBLE, None
        return Status.OPTIMAL, best_choice
