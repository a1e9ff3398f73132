"""Benchmark: do the latency cost models predict the decode time of real plans on this CPU?

    .venv/bin/python benchmarks/latency.py [--plans-dir runs/latency/plans] [--context 512] [--steps 32] [--rounds 2]

Every plan's decision linears are packed into real kernels (:mod:`mpsearch.kernels`: torch's
fused int4 matmul for 4-bit formats, unpack + dequantize + matmul for the others, bf16 dense
for unquantized tensors, the LM head in bf16) and the deployed model decodes ``steps`` tokens
after a ``context``-token prompt; the measured time is the median step, the median over
``rounds`` rounds that visit the plans in alternating order. The packed weights are SmolLM2's
own (timing does not depend on the values).

Predictions for the same plans:
- ``measured table``: ``mpsearch profile-device``'s kernel times (fastest kernel per layer shape
  and format, timed inside the deployed model) plus the fixed part (the deployed unquantized
  model's step minus its linears), measured fresh at the start of this run (and cached: a search
  run after it reads this table);
- ``roofline``: ``latency_decode`` on ``--hardware local`` (this machine's measured GEMM peaks
  and copy bandwidth).

Plans: unquantized, uniform 2..8 bits, and every plan JSON in ``--plans-dir`` (a search's
``plans/`` folder, e.g. one run under a latency constraint).

Writes ``benchmarks/results/latency_validation.csv`` (``plan, predicted_ms, measured_ms``: the
measured-table prediction, which the allocator's ``measured_decode`` constraint reads),
``latency_validation_roofline.csv`` (the same columns, roofline) and ``latency_validation.json``
(errors, quartiles, kernels, machine, peak memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
from pathlib import Path

import pandas as pd
import torch
from foundation import machine

from mpsearch.core.format import Format
from mpsearch.core.plan import Plan
from mpsearch.core.space import SearchSpace
from mpsearch.cost.model import ModelShape, Workload, get_cost
from mpsearch.kernels.deploy import decode_ms, deploy
from mpsearch.models import load_model
from mpsearch.run.profile import local_hardware, profile_device

OUT = Path(__file__).parent / "results"
UNIFORM = ("fp16", "u8g64a", "u6g64a", "u5g64a", "u4g64a", "u4g32a", "u3g64a", "u2g64a")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans-dir", action="append", default=[], help="folders of plan JSON files to add (repeatable)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model("smollm2")
    decisions = SearchSpace.from_file("llama").build(lm.model)
    members = [m for d in decisions for m in d.members]
    plans: dict[str, dict[str, Format]] = {
        ("unquantized (bf16)" if k == "fp16" else f"uniform-{k}"): {m.name: Format.parse(k) for m in members}
        for k in UNIFORM
    }
    for d in a.plans_dir:
        for f in sorted(Path(d).glob("*.json")):
            plans[f"{Path(d).resolve().parent.name}/{f.stem}"] = Plan.load(f).weight_formats()

    hw = local_hardware(refresh=True)
    table = profile_device(
        lm.model, decisions, tokens=(1, 512), context=a.context, refresh=True, fingerprint=str(lm.model_id)
    )
    workload, shape = Workload(context=a.context), ModelShape.of(lm.model)
    measured_cost = get_cost("measured_decode")(None, workload, shape, table)
    roofline = get_cost("latency_decode")(hw, workload, shape)

    def kernels(formats: dict[str, Format]) -> dict[str, str]:
        out = {}
        for m in members:
            t = table.timings(m.in_features, m.out_features, formats[m.name], 1)
            out[m.name] = min(t, key=t.get)
        return out

    times: dict[str, list[float]] = {n: [] for n in plans}
    for r in range(a.rounds):
        for name in list(plans) if r % 2 == 0 else list(plans)[::-1]:
            model = deploy(lm.model, plans[name], kernels(plans[name]))
            times[name].append(decode_ms(model, context=a.context, steps=a.steps)["median_ms"])
            del model
            print(f"round {r + 1}: {name}: {times[name][-1]:.2f} ms", flush=True)
    rows, roof = [], []
    for name, fm in plans.items():
        meas = statistics.median(times[name])
        rows.append({"plan": name, "predicted_ms": measured_cost.total(fm, members) * 1e3, "measured_ms": meas})
        roof.append({"plan": name, "predicted_ms": roofline.total(fm, members) * 1e3, "measured_ms": meas})
    df, rf = pd.DataFrame(rows), pd.DataFrame(roof)
    OUT.mkdir(exist_ok=True)
    df.to_csv(OUT / "latency_validation.csv", index=False)
    rf.to_csv(OUT / "latency_validation_roofline.csv", index=False)

    def errors(t: pd.DataFrame) -> dict:
        rel = (t.predicted_ms - t.measured_ms) / t.measured_ms
        from scipy.stats import spearmanr

        return {
            "median_abs_rel_error": float(rel.abs().median()),
            "max_abs_rel_error": float(rel.abs().max()),
            "mean_rel_error": float(rel.mean()),
            "spearman": float(spearmanr(t.predicted_ms, t.measured_ms).statistic),
        }

    summary = {
        "context": a.context,
        "steps": a.steps,
        "rounds": a.rounds,
        "measured_table": errors(df),
        "roofline": errors(rf),
        "per_plan_rounds_ms": times,
        "fixed": table.fixed,
        "local_hardware": {"peak": hw.peak, "bandwidth": hw.bandwidth},
        "kernels": {n: pd.Series(kernels(fm)).value_counts().to_dict() for n, fm in plans.items()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": machine(a.threads),
    }
    (OUT / "latency_validation.json").write_text(json.dumps(summary, indent=1))
    print(df.round(2).to_string(index=False))
    print(json.dumps({k: summary[k] for k in ("measured_table", "roofline")}, indent=1))


if __name__ == "__main__":
    main()
