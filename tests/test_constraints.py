"""Several cost tables at once (bits + BOPs + latency): the MILP against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpsearch.solvers import MILP, BruteForce, Constraint, Greedy, Problem, Status

pytestmark = pytest.mark.skipif(not MILP.is_available(), reason="HiGHS (highspy) not installed")


@st.composite
def two_constraint_problems(draw: st.DrawFn) -> Problem:
    """Random instances with a budget and two further tables; integer values create ties."""
    n = draw(st.integers(1, 5))
    sizes = [draw(st.integers(1, 4)) for _ in range(n)]
    ints = st.integers(0, 9).map(float)
    loss = [[draw(ints) for _ in range(k)] for k in sizes]
    tables = [[[draw(ints) for _ in range(k)] for k in sizes] for _ in range(3)]
    limits = []
    for t in tables:
        lo, hi = sum(min(r) for r in t), sum(max(r) for r in t)
        limits.append(draw(st.floats(lo, hi)) if hi > lo else lo)
    names = [f"d{i}" for i in range(n)]
    opts = [[f"o{j}" for j in range(k)] for k in sizes]
    extra = [Constraint("bops", tables[1], limits[1]), Constraint("latency", tables[2], limits[2])]
    return Problem.build(names, opts, loss, tables[0], limits[0], extra)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(two_constraint_problems())
def test_milp_with_two_extra_constraints_matches_brute_force(problem: Problem) -> None:
    brute = BruteForce().solve(problem)
    milp = MILP().solve(problem)
    assert milp.status_ == brute.status_, (milp.solver_status_, brute.choice_)
    if brute.status_ == Status.INFEASIBLE:
        assert milp.choice_ is None
        return
    assert problem.feasible(milp.choice_)
    assert abs(milp.loss_ - brute.loss_) <= 1e-9 * max(1.0, abs(brute.loss_))
    assert set(milp.constraint_costs_) == {"bops", "latency"}


def test_extra_constraint_changes_the_optimum() -> None:
    # Without the latency row the best plan upgrades 'a'; latency forbids it, so 'b' is upgraded.
    names, opts = ["a", "b"], [["lo", "hi"]] * 2
    loss, bits = [[10.0, 0.0], [5.0, 0.0]], [[1.0, 2.0], [1.0, 2.0]]
    latency = Constraint("latency", [[1.0, 9.0], [1.0, 2.0]], 4.0)
    plain = MILP().solve(Problem.build(names, opts, loss, bits, 3.0))
    both = MILP().solve(Problem.build(names, opts, loss, bits, 3.0, [latency]))
    assert plain.choice_ == (1, 0)
    assert both.choice_ == (0, 1) and both.constraint_costs_ == {"latency": 3.0}


def test_jointly_infeasible_constraints_are_a_status() -> None:
    # Each table fits on its own, but no single plan fits both.
    names, opts = ["a"], [["x", "y"]]
    p = Problem.build(names, opts, [[0.0, 0.0]], [[1.0, 5.0]], 1.0, [Constraint("bops", [[5.0, 1.0]], 1.0)])
    assert p.is_feasible  # the necessary per-table check passes
    for solver in (MILP(), BruteForce()):
        assert solver.solve(p).status_ == Status.INFEASIBLE


def test_heuristic_solvers_refuse_extra_constraints_by_name() -> None:
    p = Problem.build(["a"], [["x"]], [[0.0]], [[1.0]], 1.0, [Constraint("bops", [[1.0]], 1.0)])
    with pytest.raises(ValueError, match="greedy.*bops.*milp"):
        Greedy().solve(p)


@pytest.mark.parametrize(
    "constraint, message",
    [
        (Constraint("bops", [[1.0, 2.0]], 3.0), "1 cost rows for 2 decisions"),
        (Constraint("bops", [[1.0], [1.0, 2.0]], 3.0), "1 costs for 2 options"),
        (Constraint("bops", [[1.0, -1.0], [1.0, 2.0]], 3.0), "finite and >= 0"),
        (Constraint("bops", [[1.0, np.nan], [1.0, 2.0]], 3.0), "finite and >= 0"),
    ],
)
def test_malformed_constraints_name_the_problem(constraint: Constraint, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Problem.build(["a", "b"], [["x", "y"]] * 2, [[1, 0], [1, 0]], [[1, 2], [1, 2]], 3.0, [constraint])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # PuLP 3.3 announces its 4.0 API
def test_milp_matches_cbc_on_hawq_v3_resnet18() -> None:
    """HAWQ-V3's published ResNet-18 ILP (size, BOPs and latency at once): same optimum as PuLP/CBC."""
    import json
    from pathlib import Path

    pulp = pytest.importorskip("pulp")
    net = json.loads((Path(__file__).parents[1] / "benchmarks" / "data" / "hawq_v3_ilp.json").read_text())["resnet18"]
    trace = np.array(net["hutchinson_trace"])
    loss = np.stack([trace * np.array(net["delta_w_sq_4bit"]), trace * np.array(net["delta_w_sq_8bit"])], 1)
    tables = {
        "size": np.outer(net["parameters"], [0.5, 1.0]),
        "bops": np.outer(net["bops"], [1 / 64, 1 / 16]),
        "latency": np.stack([net["latency_int4"], net["latency_int8"]], 1),
    }
    limits = {k: t[:, 0].sum() + 0.5 * (t[:, 1].sum() - t[:, 0].sum()) for k, t in tables.items()}
    n, ties = len(trace), net["ties"]
    tied = {b for _, b in ties}
    groups = [[i] + [b for a, b in ties if a == i] for i in range(n) if i not in tied]
    merged = {k: [t[g].sum(0) for g in groups] for k, t in {**tables, "loss": loss}.items()}
    p = Problem.build(
        [str(g) for g in groups],
        [["4", "8"]] * len(groups),
        merged["loss"],
        merged["size"],
        limits["size"],
        [Constraint(k, merged[k], limits[k]) for k in ("bops", "latency")],
    )
    ours = MILP().solve(p)

    prob = pulp.LpProblem("hawq", pulp.LpMinimize)
    x = [pulp.LpVariable(f"x{i}", cat=pulp.LpBinary) for i in range(n)]  # 1 = 8 bit
    for k, t in tables.items():
        prob += pulp.lpSum(t[i, 0] + x[i] * (t[i, 1] - t[i, 0]) for i in range(n)) <= limits[k]
    for a, b in ties:
        prob += x[a] == x[b]
    prob += pulp.lpSum(loss[i, 0] + x[i] * (loss[i, 1] - loss[i, 0]) for i in range(n))
    prob.solve(pulp.PULP_CBC_CMD(msg=False))
    assert pulp.LpStatus[prob.status] == "Optimal"
    assert ours.status_ == Status.OPTIMAL
    assert ours.loss_ == pytest.approx(pulp.value(prob.objective), rel=1e-9)
