"""Measured refinement: the returned plan is the best measured one, baselines included; a proxy
that misleads is reported (issue 11, item 4)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mpsearch.run.search import search


@pytest.fixture
def misleading(tmp_path):
    """A proxy that calls large errors cheap: its MILP plan is poor and it predicts otherwise."""
    path = tmp_path / "upside_down.toml"
    path.write_text('name = "upside_down"\nexpression = "1 / (sum(dw**2) + 1e-3)"\ndescription = "wrong on purpose"\n')
    return str(path)


def test_the_returned_plan_is_the_best_measured_and_fits_the_budget(tiny_run):
    res = search(tiny_run(refine=6))
    t = res.table.set_index("plan")
    ret = t.loc["returned@uniform:3"]
    assert ret.kind == "returned"
    candidates = t[(t.budget == "uniform:3") & (t.kind != "returned")]
    assert ret.slice_kl == candidates.slice_kl.min() and ret.source in candidates.index
    assert (candidates.effective_bits <= 3.5 + 1e-9).all()
    assert {"proxy", "uniform", "recipe"} <= set(candidates.kind)
    assert list(candidates[candidates.kind == "refined"].index) == ["fisher-refined@uniform:3"]  # the best refined plan
    record = pd.read_csv(res.out_dir / "refinement.csv")
    made = record[record.kind == "refined"]
    assert 1 <= len(made) <= 6  # the stated number of evaluations
    assert t.loc["fisher-refined@uniform:3"].slice_kl == made.slice_kl.min()
    assert (record.effective_bits <= 3.5 + 1e-9).all()
    summary = json.loads((res.out_dir / "summary.json").read_text())
    assert summary["returned"] == {"uniform:3": ret.source}
    assert summary["correlation"]["fisher"]["plans"] == len(candidates)
    assert summary["slice_correlation"]["fisher"]["plans"] == len(record)


def test_a_misleading_proxy_is_warned_about_and_never_returned_over_a_better_baseline(tiny_run, misleading, caplog):
    with caplog.at_level("WARNING"):
        res = search(tiny_run(proxies=(misleading,), refine=4))
    t = res.table.set_index("plan")
    proxy_plan = t.loc["upside_down-milp@uniform:3"]
    uniform = t.loc["uniform-u3g64a"]
    assert proxy_plan.kl > uniform.kl and proxy_plan["predicted_upside_down"] < uniform["predicted_upside_down"]
    assert any("upside_down-milp@uniform:3 was predicted to beat uniform-u3g64a" in w for w in res.summary["warnings"])
    assert "was predicted to beat" in caplog.text
    assert res.summary["correlation"]["upside_down"]["spearman"] < 0
    assert t.loc["returned@uniform:3"].slice_kl <= uniform.slice_kl


def test_refinement_off_returns_nothing_extra(tiny_run):
    res = search(tiny_run(refine=0))
    assert not (res.table.kind.isin(["returned", "refined"])).any() and "slice_kl" not in res.table


def test_trust_region_path_runs_from_the_proxy_plan_to_the_anchor():
    from mpsearch.run.refine import trust_region_path
    from mpsearch.solvers import Problem

    rng = np.random.default_rng(0)
    cost = [np.array([1.0, 2.0, 3.0])] * 6
    loss = [np.sort(rng.random(3))[::-1] * (i + 1) for i in range(6)]
    problem = Problem.build([f"d{i}" for i in range(6)], [["a", "b", "c"]] * 6, loss, cost, 12.0)
    anchor = (1,) * 6
    start = tuple(
        int(j)
        for j in __import__("mpsearch.solvers", fromlist=["get_solver"]).get_solver("milp").solve(problem).choice_
    )
    path = trust_region_path(problem, start, anchor)
    assert path and path[-1] == anchor  # a large enough mu keeps the baseline
    assert all(sum(cost[i][j] for i, j in enumerate(c)) <= 12.0 + 1e-9 for c in path)
    moved = [sum(c != a for c, a in zip(choice, anchor)) for choice in path]
    assert moved == sorted(moved, reverse=True)  # more weight, closer to the anchor
