"""The Lagrangian Pareto sweep against brute force."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import numpy as np
from hypothesis import HealthCheck, given, settings

from mpsearch.solvers import BruteForce, Problem, Status, get_solver
from mpsearch.solvers.lagrangian import decision_hull, pareto_front

from .test_solvers import random_problem, small_problems, within_budget


def all_plans(problem: Problem) -> np.ndarray:
    """(cost, loss) of every plan."""
    return np.array([problem.evaluate(c)[::-1] for c in itertools.product(*(range(len(o)) for o in problem.options))])


def below_or_on_hull(points: np.ndarray, front_costs: np.ndarray, front_losses: np.ndarray, tol: float) -> bool:
    """Every plan lies on or above the piecewise-linear front (within its cost range)."""
    inside = points[:, 0] <= front_costs[-1]
    # compare a hair to the right: summing the same costs in another order can round a plan's cost down
    x = points[inside, 0] + 1e-9 * np.maximum(1.0, np.abs(points[inside, 0]))
    interp = np.interp(x, front_costs, front_losses)
    return bool(np.all(points[inside, 1] >= interp - tol))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_front_points_are_optimal_plans_and_lie_under_every_plan(problem: Problem) -> None:
    front = pareto_front(problem)
    tol = 1e-7 * max(1.0, float(np.abs(front.losses).max()))
    # strictly monotone in exact arithmetic; a step below the float resolution of the running total may vanish
    assert np.all(np.diff(front.costs) >= 0) and np.all(np.diff(front.losses) <= 0)
    assert front.costs[0] == problem.min_budget
    for k in range(len(front)):
        loss, cost = problem.evaluate(front.choice(k))
        assert np.isclose(cost, front.costs[k], rtol=1e-9, atol=1e-9) and np.isclose(
            loss, front.losses[k], rtol=1e-9, atol=1e-9
        )
        if k + 1 < len(front) and front.costs[k + 1] == front.costs[k]:
            continue  # the next step's cost vanished in float rounding: only that point is optimal here
        brute = BruteForce().solve(replace(problem, budget=cost))
        assert brute.loss_ >= loss - tol  # nothing at that cost beats the front point
    # the last point is the unconstrained optimum
    assert np.isclose(front.losses[-1], sum(float(l.min()) for l in problem.loss), atol=tol)
    assert below_or_on_hull(all_plans(problem), front.costs, front.losses, tol)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_lagrangian_solver_is_feasible_and_never_beats_brute_force(problem: Problem) -> None:
    lag, brute = get_solver("lagrangian").solve(problem), BruteForce().solve(problem)
    assert lag.status_ == (Status.OPTIMAL if brute.status_ == Status.OPTIMAL else Status.INFEASIBLE)
    if brute.status_ == Status.OPTIMAL:
        assert within_budget(lag.cost_, problem.budget)
        assert lag.loss_ >= brute.loss_ - 1e-7 * max(1.0, abs(brute.loss_))


def test_decision_hull_drops_dominated_and_concave_options() -> None:
    cost = np.array([1.0, 2.0, 3.0, 4.0, 2.0])
    loss = np.array([10.0, 9.5, 4.0, 3.0, 12.0])  # option 1 is above the 0->2 chord, 4 is dominated
    assert decision_hull(loss, cost) == [0, 2, 3]


def test_front_of_a_large_instance_is_fast() -> None:
    problem = random_problem(np.random.default_rng(0), 10_000, 8)
    t0 = time.perf_counter()
    front = pareto_front(problem)
    elapsed = time.perf_counter() - t0
    print(f"10,000 x 8 Pareto front: {len(front)} points in {elapsed:.3f} s")
    assert len(front) > 10_000
