"""Benchmark: allocator speed and quality of prediction on the same problems.

Problems: the default model's Fisher proxy table (SmolLM2-135M, 120 decisions, 1,740
options; calibration as in benchmarks/foundation.py) at the effective bits of uniform
3- and 4-bit, and a synthetic 10,000-decision x 8-option instance. For each registered
allocator: median wall time over repeats and the predicted loss relative to the exact
MILP; and the time to compute the whole Pareto front. Predicted loss only: measured
quality of these plans is the foundation benchmark's job.

    .venv/bin/python benchmarks/allocators.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch
from foundation import RESULTS, machine  # noqa: E402  (same folder)

from mpsearch.core import registry
from mpsearch.core.files import write_json_atomic
from mpsearch.core.space import SearchSpace
from mpsearch.cost import Budget, decision_costs
from mpsearch.models import load_model, load_text, token_chunks
from mpsearch.primitives import compute_primitives
from mpsearch.proxies import load_proxy
from mpsearch.proxies.table import decision_losses
from mpsearch.run.cached import cached_proxy_table
from mpsearch.solvers import Problem, get_solver, pareto_front

SIZES: dict[str, list[float]] = {}  # weights per decision, for BAQ


def model_problems() -> dict[str, Problem]:
    lm = load_model()
    space = SearchSpace.from_file("llama")
    decisions = space.build(lm.model)
    calib = token_chunks(lm.tokenizer, load_text("austen:prideprejudice"), 512, 8)
    proxy = load_proxy("fisher")
    prims = compute_primitives(lm.model, [m.name for d in decisions for m in d.members], calib, proxy.needs)
    table = cached_proxy_table(proxy, lm.model, decisions, prims)
    losses, costs = decision_losses(table, decisions), decision_costs(decisions)
    numel = sum(d.numel for d in decisions)
    out = {}
    for label in ("uniform:3", "uniform:4"):
        b = Budget.parse(label, decisions, space.base_format)
        SIZES[f"smollm2-fisher@{label}"] = [d.numel for d in decisions]
        out[f"smollm2-fisher@{label}"] = Problem.build(
            [d.name for d in decisions],
            [[f.key for f in d.formats] for d in decisions],
            losses,
            costs,
            b.total_bits(numel),
        )
    return out


def synthetic(n: int = 10_000, k: int = 8, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 5, 6, 8, 12, 16], dtype=float)[:k]
    sizes = rng.integers(10_000, 1_000_000, n).astype(float)
    scale = rng.lognormal(0, 2, n)
    loss = [s * 2.0 ** (-2 * bits) * rng.uniform(0.8, 1.2, k) for s in scale]
    cost = [bits * m for m in sizes]
    p = Problem.build([f"t{i}" for i in range(n)], [[f"{b:g}" for b in bits]] * n, loss, cost, 0.0)
    SIZES["synthetic-10000x8@4bits"] = list(sizes)
    return Problem.build(p.decisions, p.options, p.loss, p.cost, 4.0 * float(sizes.sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    problems = {**model_problems(), "synthetic-10000x8@4bits": synthetic()}
    rows = []
    for pname, problem in problems.items():
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            front = pareto_front(problem)
            times.append(time.perf_counter() - t0)
        rows.append(
            {
                "problem": pname,
                "allocator": "pareto_front",
                "median_s": float(np.median(times)),
                "front_points": len(front),
            }
        )
        exact = None
        for sname in ["milp"] + [s for s in registry.names("solver") if s not in ("milp", "brute")]:
            params = {"gap": 1e-5} if sname == "milp" and problem.n_decisions > 1000 else {}
            if sname == "baq":
                params = {"sizes": SIZES[pname]}
            times, res = [], None
            for _ in range(a.repeats if sname != "milp" else max(1, a.repeats // 2)):
                res = get_solver(sname, **params).solve(problem)
                times.append(res.wall_time_)
            if sname == "milp":
                exact = res.loss_
            rows.append(
                {
                    "problem": pname,
                    "allocator": sname + (" (gap 1e-5)" if "gap" in params else ""),
                    "median_s": float(np.median(times)),
                    "status": res.status_,
                    "loss_vs_milp": res.loss_ / exact if exact else float("nan"),
                    "budget_used": res.cost_ / problem.budget,
                }
            )
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    out = RESULTS / "allocators"
    df.to_csv(out.with_suffix(".csv"), index=False)
    write_json_atomic(
        out.with_suffix(".json"),
        {"machine": machine(a.threads), "repeats": a.repeats, "results": json.loads(df.to_json(orient="records"))},
    )


if __name__ == "__main__":
    main()
