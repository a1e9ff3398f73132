"""Benchmark: HAWQ-V3's latency-constrained allocations from its published T4 latency tables,
and what the T4 roofline (``hardware/t4.toml``) would have chosen instead.

    .venv/bin/python benchmarks/hawq_latency.py

For ResNet-18 and ResNet-50 (the per-layer arrays of HAWQ-V3's public ILP notebook,
``benchmarks/data/hawq_v3_ilp.json``), at latency limits ``lat4 + f (lat8 - lat4)`` for
f = 0.25, 0.5, 0.75 (the notebook's form):

1. **Published table**: the latency-constrained ILP solved by our MILP (tied layers one
   decision) and by PuLP/CBC on HAWQ-V3's own formulation: same allocation, same objective?
2. **Roofline**: each layer's int4 / int8 latency predicted on the T4 profile from its MACs
   (the notebook's ``bops`` arrays count MACs) and its weight bytes: ``max(2 MACs / peak,
   bytes / bandwidth)`` (activation traffic is not in the notebook, so it is left out).
   How well it ranks and scales the published per-layer latencies, and which allocation the
   same ILP makes with it (limit set the same way on the roofline's sums): the bits it
   agrees on, and the plan's published latency against the published limit.

Writes ``benchmarks/results/hawq_latency.csv`` and ``hawq_latency.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from foundation import RESULTS, machine
from scipy.stats import spearmanr
from solvers_vs_cbc import BITS, DATA, cbc, groups, layer_tables, ours

from mpsearch.cost.hardware import load_hardware

warnings.filterwarnings("ignore", category=DeprecationWarning, module="pulp")


def roofline_ms(net: dict, hw) -> np.ndarray:
    """(layers x 2) predicted milliseconds at int4 and int8 (inputs at the same bits)."""
    millions = "bops_millions" in net
    macs = np.array(net["bops_millions" if millions else "bops"], dtype=float) * (1e6 if millions else 1.0)
    params = np.array(net["parameters_millions" if millions else "parameters"], dtype=float) * (
        1e6 if millions else 1.0
    )
    cols = []
    for b in BITS:
        peak = hw.peak[hw.compute_type(b, b)]
        cols.append(np.maximum(2 * macs / peak, params * b / 8 / hw.bandwidth) * 1e3)
    return np.stack(cols, 1)


def main() -> None:
    data = json.loads(DATA.read_text())
    t4 = load_hardware("t4")
    rows, fits = [], {}
    for name in ("resnet18", "resnet50"):
        net = data[name]
        tables = layer_tables(net)
        published = tables["latency"]
        roof = roofline_ms(net, t4)
        fits[name] = {
            "spearman_int4": float(spearmanr(roof[:, 0], published[:, 0]).statistic),
            "spearman_int8": float(spearmanr(roof[:, 1], published[:, 1]).statistic),
            "median_published_over_roofline_int4": float(np.median(published[:, 0] / roof[:, 0])),
            "median_published_over_roofline_int8": float(np.median(published[:, 1] / roof[:, 1])),
            "int8_over_int4_published": float(published[:, 1].sum() / published[:, 0].sum()),
            "int8_over_int4_roofline": float(roof[:, 1].sum() / roof[:, 0].sum()),
        }
        grp = groups(len(published), net["ties"])
        for f in (0.25, 0.5, 0.75):
            limit = float(published[:, 0].sum() + f * (published[:, 1].sum() - published[:, 0].sum()))
            plan_ours, loss_ours = ours(tables, grp, ["latency"], {"latency": limit})
            plan_cbc, loss_cbc = cbc(tables, net["ties"], ["latency"], {"latency": limit})
            rt = {**tables, "latency": roof}
            r_limit = float(roof[:, 0].sum() + f * (roof[:, 1].sum() - roof[:, 0].sum()))
            plan_roof, loss_roof = ours(rt, grp, ["latency"], {"latency": r_limit})
            lat = lambda plan: float(sum(published[i, BITS.index(b)] for i, b in enumerate(plan)))  # noqa: E731
            rows.append(
                {
                    "net": name,
                    "f": f,
                    "limit_ms": limit,
                    "layers": len(published),
                    "same_plan_as_cbc": plan_ours == plan_cbc,
                    "loss_ours": loss_ours,
                    "loss_cbc": loss_cbc,
                    "int8_layers": sum(b == 8 for b in plan_ours),
                    "published_ms": lat(plan_ours),
                    "roofline_int8_layers": sum(b == 8 for b in plan_roof),
                    "roofline_agrees_layers": sum(a == b for a, b in zip(plan_ours, plan_roof)),
                    "roofline_plan_published_ms": lat(plan_roof),
                    "roofline_plan_meets_limit": lat(plan_roof) <= limit + 1e-9,
                    "roofline_plan_loss": loss_roof,
                    "bits": "".join("8" if b == 8 else "4" for b in plan_ours),
                    "roofline_bits": "".join("8" if b == 8 else "4" for b in plan_roof),
                }
            )
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(RESULTS / "hawq_latency.csv", index=False)
    summary = {
        "roofline_vs_published": fits,
        "all_same_as_cbc": bool(df.same_plan_as_cbc.all()),
        "t4": {"peak": t4.peak, "bandwidth": t4.bandwidth, "sources": t4.sources},
        "machine": machine(1),
    }
    Path(RESULTS / "hawq_latency.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(fits, indent=1))


if __name__ == "__main__":
    main()
