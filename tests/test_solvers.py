"""Solvers agree with brute force, handle infeasible budgets calmly, and scale."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpsearch.core.registry import UnknownComponentError
from mpsearch.solvers import MILP, Allocator, BruteForce, Problem, SolverError, Status, get_solver

pytestmark = pytest.mark.skipif(not MILP.is_available(), reason="HiGHS (highspy) not installed")


def within_budget(cost: float, budget: float) -> bool:
    return cost <= budget + 1e-9 * abs(budget)


def close(a: float, b: float, tol: float = 1e-6) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def random_problem(rng: np.random.Generator, n: int, k: int, budget_frac: float = 0.5) -> Problem:
    """Quantisation-like instance: more bits -> lower loss, higher cost."""
    loss = [np.sort(rng.random(k))[::-1] * rng.random() for _ in range(n)]
    cost = [np.sort(rng.integers(1, 100, k)).astype(float) * 1e6 for _ in range(n)]
    opts = [[f"b{j}" for j in range(k)]] * n
    names = [f"layer{i}" for i in range(n)]
    p = Problem.build(names, opts, loss, cost, 0.0)
    budget = p.min_budget + budget_frac * (p.max_useful_budget - p.min_budget)
    return Problem.build(names, opts, loss, cost, budget)


@st.composite
def small_problems(draw: st.DrawFn) -> Problem:
    n = draw(st.integers(1, 6))
    sizes = [draw(st.integers(1, 5)) for _ in range(n)]
    integer_costs = draw(st.booleans())  # integer costs and losses create ties
    scale = draw(st.sampled_from([1.0, 1e3, 1e8]))  # large costs exercise the solver's scaling
    loss, cost = [], []
    for k in sizes:
        if integer_costs:
            loss.append([float(draw(st.integers(0, 5))) for _ in range(k)])
            cost.append([float(draw(st.integers(0, 8))) * scale for _ in range(k)])
        else:
            loss.append(draw(st.lists(st.floats(0, 100, allow_subnormal=False), min_size=k, max_size=k)))
            cost.append(draw(st.lists(st.floats(0, 50, allow_subnormal=False), min_size=k, max_size=k)))
            cost[-1] = [c * scale for c in cost[-1]]
    names = [f"d{i}" for i in range(n)]
    opts = [[f"o{j}" for j in range(k)] for k in sizes]
    probe = Problem.build(names, opts, loss, cost, 0.0)
    lo = probe.min_budget * 0.9
    hi = sum(max(c) for c in cost) * 1.1
    budget = draw(st.one_of(st.floats(lo, max(lo, hi)), st.sampled_from([probe.min_budget, hi])))
    return Problem.build(names, opts, loss, cost, budget)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_milp_matches_brute_force(problem: Problem) -> None:
    brute = BruteForce().solve(problem)
    # Brute force honours the budget exactly; a float MILP may also take a plan that
    # overshoots by <= 1e-9 relative. So: never worse than the exact optimum, never
    # better than the optimum under the loosened budget (the two are equal unless
    # hypothesis put a plan's cost right at the budget edge).
    loose = BruteForce().solve(replace(problem, budget=problem.budget + 1e-9 * abs(problem.budget)))
    controlled = None if brute.loss_ is None else brute.loss_ - sum(float(l.min()) for l in problem.loss)
    for milp in (MILP().solve(problem), MILP(gap=1e-5).solve(problem)):
        assert milp.status_ == brute.status_
        assert milp.min_budget_ == brute.min_budget_ == problem.min_budget
        if brute.status_ == Status.INFEASIBLE:
            assert milp.choice_ is None and milp.loss_ is None and milp.cost_ is None
            continue
        assert milp.status_ == Status.OPTIMAL
        assert within_budget(milp.cost_, problem.budget)
        assert (milp.loss_, milp.cost_) == problem.evaluate(milp.choice_)  # exact float64 re-evaluation
        # gap=0 must match to 1e-6; the default gap may add gap * (budget-controlled loss).
        slack = 1e-6 * max(1.0, abs(brute.loss_)) + milp.gap * 1.01 * controlled
        assert milp.loss_ <= brute.loss_ + slack, (milp.gap, milp.choice_, brute.choice_)
        assert milp.loss_ >= loose.loss_ - 1e-6 * max(1.0, abs(loose.loss_)), (milp.choice_, loose.choice_)


@pytest.mark.parametrize("seed", range(8))
def test_tied_groups_match_restricted_brute_force(seed: int) -> None:
    """Two tied pairs (0,1) and (2,3) are one decision each, with summed loss and cost."""
    rng = np.random.default_rng(seed)
    bits = ["2", "4", "8"]
    t_loss = [np.sort(rng.random(3))[::-1] * rng.uniform(0.1, 3) for _ in range(5)]
    t_cost = [np.array([2.0, 4.0, 8.0]) * rng.integers(10, 1000) for _ in range(5)]
    groups = [(0, 1), (2, 3), (4,)]
    lo = sum(c.min() for c in t_cost)
    hi = sum(c.max() for c in t_cost)
    for frac in (0.0, 0.2, 0.45, 0.7, 1.0):
        budget = lo + frac * (hi - lo)
        problem = Problem.build(
            ["+".join(f"t{m}" for m in g) for g in groups],
            [bits] * len(groups),
            [sum(t_loss[m] for m in g) for g in groups],
            [sum(t_cost[m] for m in g) for g in groups],
            budget,
        )
        best = None
        for choice in itertools.product(range(3), repeat=5):
            if choice[0] != choice[1] or choice[2] != choice[3]:
                continue
            cost = sum(t_cost[m][j] for m, j in enumerate(choice))
            loss = sum(t_loss[m][j] for m, j in enumerate(choice))
            if cost <= budget and (best is None or loss < best):
                best = loss
        milp = MILP(gap=0.0).solve(problem)
        assert milp.status_ == Status.OPTIMAL
        assert close(milp.loss_, best, 1e-9)
        assert within_budget(milp.cost_, budget)


def test_infeasible_budget_is_a_status_not_an_exception() -> None:
    problem = Problem.build(["a", "b"], [["x", "y"], ["x", "y"]], [[1, 0], [2, 0]], [[3, 5], [4, 9]], 6.5)
    for solver in (MILP(), BruteForce()):
        result = solver.solve(problem)
        assert result is solver
        assert result.status_ == Status.INFEASIBLE
        assert result.choice_ is None and result.loss_ is None and result.cost_ is None
        assert result.min_budget_ == 7.0
        assert result.problem_ is problem


def test_budget_just_below_min_budget_is_feasible_within_tolerance() -> None:
    problem = Problem.build(["a", "b"], [["x", "y"]] * 2, [[1, 0], [2, 0]], [[3, 5], [4, 9]], 7.0 * (1 - 1e-12))
    result = MILP().solve(problem)
    assert result.status_ == Status.OPTIMAL and result.choice_ == (0, 0)


@pytest.mark.parametrize("field", ["loss", "cost"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values_name_the_decision(field: str, bad: float) -> None:
    arrays = {"loss": [[1.0, 0.5], [2.0, 1.0]], "cost": [[1.0, 2.0], [1.0, 2.0]]}
    arrays[field][1][0] = bad
    with pytest.raises(ValueError, match=r"'conv2\.weight'.*'int4'"):
        Problem.build(["conv1.weight", "conv2.weight"], [["int4", "int8"]] * 2, arrays["loss"], arrays["cost"], 3.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(decisions=["a"], options=[["x"], ["y"]], loss=[[1]], cost=[[1]], budget=1), "lengths differ"),
        (dict(decisions=["a"], options=[[]], loss=[[]], cost=[[]], budget=1), "no options"),
        (dict(decisions=["a"], options=[["x", "y"]], loss=[[1]], cost=[[1, 2]], budget=1), "1 entries for 2"),
        (dict(decisions=["a"], options=[["x"]], loss=[[1]], cost=[[-1]], budget=1), "negative"),
        (dict(decisions=["a"], options=[["x"]], loss=[[1]], cost=[[1]], budget=math.inf), "budget"),
        (dict(decisions=["a", "a"], options=[["x"]] * 2, loss=[[1]] * 2, cost=[[1]] * 2, budget=3), "duplicate"),
    ],
)
def test_problem_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Problem.build(**kwargs)


def test_problem_budgets_and_immutability() -> None:
    # decision a: min loss 0 at options 1 and 2 (tie -> cheaper cost 5); decision b: min loss at option 0.
    problem = Problem.build(["a", "b"], [["x", "y", "z"], ["x", "y"]], [[1, 0, 0], [0, 3]], [[3, 6, 5], [4, 2]], 10)
    assert problem.min_budget == 3 + 2
    assert problem.max_useful_budget == 5 + 4
    assert isinstance(problem.loss, tuple) and problem.loss[0].dtype == np.float64
    with pytest.raises(ValueError):
        problem.loss[0][0] = 7.0  # read-only arrays
    result = MILP().solve(problem)  # budget 10 >= max useful: unconstrained optimum
    assert result.choice_ == (2, 0) and result.loss_ == 0.0 and result.cost_ == 9.0


def test_brute_force_ties_and_limit() -> None:
    problem = Problem.build(["a", "b"], [["x", "y", "z"]] * 2, [[1, 1, 1], [0, 0, 0]], [[2, 1, 1], [1, 1, 1]], 5)
    assert BruteForce().solve(problem).choice_ == (1, 0)  # lowest loss, then cost, then lexicographic
    big = Problem.build([f"d{i}" for i in range(14)], [["a", "b", "c"]] * 14, [[0, 0, 0]] * 14, [[0, 0, 0]] * 14, 1)
    with pytest.raises(ValueError, match="milp"):
        BruteForce().solve(big)


@pytest.mark.parametrize("seed", range(3))
def test_reduction_matches_full_highs_model(seed: int) -> None:
    """~200 x 20: the Lagrangian core reduction must not change the optimum."""
    import cvxpy as cp

    rng = np.random.default_rng(seed)
    problem = random_problem(rng, 200, 20, budget_frac=rng.uniform(0.1, 0.9))
    result = MILP(gap=0.0).solve(problem)
    assert result.status_ == Status.OPTIMAL
    assert within_budget(result.cost_, problem.budget)

    loss, cost = np.concatenate(problem.loss), np.concatenate(problem.cost)
    x = cp.Variable(loss.size, boolean=True)
    one_hot = np.kron(np.eye(200), np.ones(20))
    full = cp.Problem(cp.Minimize(loss @ x), [one_hot @ x == 1, (cost / 1e8) @ x <= problem.budget / 1e8])
    full.solve(solver=cp.HIGHS, mip_rel_gap=1e-10, mip_abs_gap=1e-12)
    assert full.status == cp.OPTIMAL
    assert result.loss_ <= full.value + 1e-7 * abs(full.value)


@pytest.mark.parametrize("budget_frac", [0.5, 0.95])  # 0.95 leaves HiGHS a real core to solve
def test_large_instance_solves(budget_frac: float) -> None:
    problem = random_problem(np.random.default_rng(0), 10_000, 8, budget_frac)
    start = time.perf_counter()
    result = MILP(gap=1e-5).solve(problem)
    elapsed = time.perf_counter() - start
    print(f"10,000 x 8 MILP solve (budget_frac={budget_frac}): {elapsed:.2f} s ({result.solver_status_})")
    assert result.status_ == Status.OPTIMAL
    assert len(result.choice_) == 10_000
    assert within_budget(result.cost_, problem.budget)


def test_time_limit_still_returns_a_feasible_plan() -> None:
    problem = random_problem(np.random.default_rng(1), 300, 8)
    result = MILP(time_limit=1e-6, gap=0.0).solve(problem)
    assert result.status_ in Status.SOLUTION_PRESENT
    assert within_budget(result.cost_, problem.budget)


def test_registry_lookup() -> None:
    solver = get_solver("milp", time_limit=5.0)
    assert isinstance(solver, MILP) and isinstance(solver, Allocator)
    assert solver.get_params() == {"time_limit": 5.0, "verbose": False, "gap": 0.0}
    assert isinstance(get_solver("brute"), BruteForce)
    with pytest.raises(UnknownComponentError, match="milp"):
        get_solver("nope")
    assert issubclass(SolverError, RuntimeError)
