"""Benchmark: our MILP against PuLP/CBC (HAWQ-V3's own tool) on HAWQ-V3's published ILPs.

Problems: the per-layer arrays of HAWQ-V3's public ILP notebook for ResNet-18 (19
layers) and ResNet-50 (52 layers), 4 or 8 bits per layer, residual/downsample pairs
tied. Loss is Hessian trace x ||dW||^2; limits are the notebook's
``cost_4bit + f * (cost_8bit - cost_4bit)`` for model size, BOPs and latency, one at a
time and all three at once (HAWQ-V3 solves them one at a time). Then synthetic
1,000 x 8 and 10,000 x 8 instances (one budget row).

Both sides are timed from arrays to plan (model building included), median of repeats,
side by side in one run; optima are compared objective to objective and plan to plan.

    .venv/bin/python benchmarks/solvers_vs_cbc.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pulp
from allocators import synthetic  # noqa: E402  (same folder)
from foundation import RESULTS, machine  # noqa: E402

from mpsearch.core.files import write_json_atomic
from mpsearch.solvers import MILP, Constraint, Problem

warnings.filterwarnings("ignore", category=DeprecationWarning, module="pulp")  # PuLP 3.3 announces its 4.0 API
DATA = Path(__file__).parent / "data" / "hawq_v3_ilp.json"
BITS = (4, 8)
CBC_TIME_LIMIT = 120  # seconds, synthetic instances


def layer_tables(net: dict) -> dict[str, np.ndarray]:
    """(layers x 2) loss and cost tables for 4 and 8 bits, in the notebook's units."""
    params = np.array(net.get("parameters", net.get("parameters_millions")), dtype=float)
    bops = np.array(net.get("bops", net.get("bops_millions")), dtype=float)
    trace = np.array(net["hutchinson_trace"])
    return {
        "loss": np.stack([trace * np.array(net["delta_w_sq_4bit"]), trace * np.array(net["delta_w_sq_8bit"])], 1),
        "size": np.stack([params * b / 8 for b in BITS], 1),
        "bops": np.stack([bops / 64, bops / 16], 1),
        "latency": np.stack([net["latency_int4"], net["latency_int8"]], 1),
    }


def groups(n: int, ties: list[list[int]]) -> list[list[int]]:
    tied = {j for t in ties for j in t[1:]}
    return [next((t for t in ties if t[0] == i), [i]) for i in range(n) if i not in tied]


def ours(
    tables: dict, grp: list[list[int]], kinds: list[str], limits: dict[str, float]
) -> tuple[tuple[int, ...], float]:
    """Tied layers become one decision (summed tables); the first kind is the budget row."""

    def merged(t: np.ndarray) -> list[np.ndarray]:
        return [t[g].sum(0) for g in grp]

    extra = [Constraint(k, merged(tables[k]), limits[k]) for k in kinds[1:]]
    p = Problem.build(
        [str(g) for g in grp],
        [["int4", "int8"]] * len(grp),
        merged(tables["loss"]),
        merged(tables[kinds[0]]),
        limits[kinds[0]],
        extra,
    )
    s = MILP().solve(p)
    bits = [0] * sum(len(g) for g in grp)
    for g, j in zip(grp, s.choice_):
        for layer in g:
            bits[layer] = BITS[j]
    return tuple(bits), s.loss_


def cbc(
    tables: dict, ties: list[list[int]], kinds: list[str], limits: dict[str, float], solver: str = "cbc"
) -> tuple[tuple[int, ...], float]:
    """HAWQ-V3's formulation: integer x in {1, 2} per layer (4/8 bit), ties as equalities."""
    n = tables["loss"].shape[0]
    prob = pulp.LpProblem("hawq", pulp.LpMinimize)
    x = [pulp.LpVariable(f"x{i}", 1, 2, cat=pulp.LpInteger) for i in range(n)]
    for k in kinds:
        t = tables[k]
        prob += pulp.lpSum(t[i, 0] + (x[i] - 1) * (t[i, 1] - t[i, 0]) for i in range(n)) <= limits[k]
    for a, b in ties:
        prob += x[a] == x[b]
    loss = tables["loss"]
    prob += pulp.lpSum((x[i] - 1) * (loss[i, 1] - loss[i, 0]) for i in range(n))
    backend = pulp.PULP_CBC_CMD(msg=False) if solver == "cbc" else pulp.HiGHS(msg=False)
    prob.solve(backend)
    if pulp.LpStatus[prob.status] != "Optimal":
        raise RuntimeError(f"PuLP/{solver}: {pulp.LpStatus[prob.status]}")
    choice = tuple(BITS[int(round(v.value())) - 1] for v in x)
    return choice, float(sum(loss[i, int(b == 8)] for i, b in enumerate(choice)))


def timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def hawq_rows(repeats: int) -> list[dict]:
    data = json.loads(DATA.read_text())
    rows = []
    for net in ("resnet18", "resnet50"):
        tables = layer_tables(data[net])
        n, ties = tables["loss"].shape[0], data[net]["ties"]
        grp = groups(n, ties)
        for f in (0.25, 0.5, 0.75):
            limits = {
                k: float(tables[k][:, 0].sum() + f * (tables[k][:, 1].sum() - tables[k][:, 0].sum()))
                for k in ("size", "bops", "latency")
            }
            for kinds in (["size"], ["bops"], ["latency"], ["size", "bops", "latency"]):
                (p_ours, l_ours), t_ours = timed(lambda: ours(tables, grp, kinds, limits), repeats)
                (p_cbc, l_cbc), t_cbc = timed(lambda: cbc(tables, ties, kinds, limits), repeats)
                (_, l_hi), t_hi = timed(lambda: cbc(tables, ties, kinds, limits, "highs"), repeats)
                rows.append(
                    {
                        "problem": f"{net} {'+'.join(kinds)} f={f}",
                        "layers": n,
                        "decisions": len(grp),
                        "loss_ours": l_ours,
                        "loss_cbc": l_cbc,
                        "loss_pulp_highs": l_hi,
                        "same_optimum": abs(l_ours - l_cbc) <= 1e-9 * max(1.0, abs(l_cbc)),
                        "same_plan": p_ours == p_cbc,
                        "s_ours": t_ours,
                        "s_cbc": t_cbc,
                        "s_pulp_highs": t_hi,
                        "cbc_over_ours": t_cbc / t_ours,
                    }
                )
                print(rows[-1])
    return rows


def synthetic_rows(repeats: int) -> list[dict]:
    rows = []
    for n in (1_000, 10_000):
        p = synthetic(n=n)
        k = len(p.options[0])
        loss, cost = np.stack(p.loss), np.stack(p.cost)

        def run_cbc():
            prob = pulp.LpProblem("mckp", pulp.LpMinimize)
            x = [[pulp.LpVariable(f"x{i}_{j}", cat=pulp.LpBinary) for j in range(k)] for i in range(n)]
            for i in range(n):
                prob += pulp.lpSum(x[i]) == 1
            prob += pulp.lpSum(cost[i, j] * x[i][j] for i in range(n) for j in range(k)) <= p.budget
            prob += pulp.lpSum(loss[i, j] * x[i][j] for i in range(n) for j in range(k))
            prob.solve(pulp.PULP_CBC_CMD(msg=False, gapRel=1e-9, timeLimit=CBC_TIME_LIMIT))
            choice = [max(range(k), key=lambda j: x[i][j].value() or 0) for i in range(n)]
            return pulp.LpStatus[prob.status], p.evaluate(choice)

        gap = 0.0 if n <= 1_000 else 1e-5
        s, t_ours = timed(lambda: MILP(gap=gap).solve(p), repeats)
        (st, (l_cbc, c_cbc)), t_cbc = timed(run_cbc, 1 if n > 1_000 else repeats)
        rows.append(
            {
                "problem": f"synthetic {n}x{k} @4 bits",
                "layers": n,
                "decisions": n,
                "milp_gap": gap,
                "loss_ours": s.loss_,
                "loss_cbc": l_cbc,
                "cbc_status": st,
                "cbc_within_budget": p.fits(c_cbc),
                "same_optimum": abs(s.loss_ - l_cbc) <= 1e-6 * abs(l_cbc),
                "rel_diff": (s.loss_ - l_cbc) / abs(l_cbc),
                "s_ours": t_ours,
                "s_cbc": t_cbc,
                "cbc_over_ours": t_cbc / t_ours,
            }
        )
        print(rows[-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    hawq, synth = hawq_rows(a.repeats), synthetic_rows(a.repeats)
    df = pd.DataFrame(hawq + synth)
    df.to_csv(RESULTS / "solvers_vs_cbc.csv", index=False)
    h = pd.DataFrame(hawq)
    summary = {
        "hawq_problems": len(h),
        "hawq_same_optimum": int(h["same_optimum"].sum()),
        "hawq_same_plan": int(h["same_plan"].sum()),
        "hawq_median_cbc_over_ours": float(h["cbc_over_ours"].median()),
        "hawq_median_s_ours": float(h["s_ours"].median()),
        "hawq_median_s_cbc": float(h["s_cbc"].median()),
        "synthetic": synth,
        "pulp_version": pulp.__version__,
        "repeats": a.repeats,
        "machine": machine(1),
    }
    write_json_atomic(RESULTS / "solvers_vs_cbc.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "synthetic"}, indent=1))


if __name__ == "__main__":
    main()
