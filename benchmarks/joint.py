"""Benchmark: joint vs separate allocation of weights and KV cache under one memory budget, at 2k and 8k context.

    .venv/bin/python benchmarks/joint.py [--bits 3.5 4.5] [--contexts 2048 8192]
    .venv/bin/python benchmarks/joint.py --model gemma3-270m --proxy fisher --contexts 2048 --windows 2

For each context and each mean-bits level ``b``, the budget is ``b`` bits per element of
(SmolLM2's 106.2M decision weights + its KV cache at that context, batch 1), in bytes. The
search space is ``llama_wkv`` (uniform RTN weights 2-8 bits in groups of 32-128, KVQuant
K/V at 2, 3, 4, 8 bits or fp16); losses are measured single-target KL (weights: the
``measured_kl`` proxy; K/V: the run-time ``kl``), both on 1 x 256 calibration tokens.

- ``joint``: one MILP over all 150 decisions;
- ``separate``: weights and KV each get the budget's share in proportion to their fp16
  bytes, each solved on its own.

Each plan is measured on the decode path: ``windows`` Persuasion windows of ``context``
tokens, prefilled through the quantized cache, the last 128 decoded one at a time.
Runs ``mpsearch.run.search`` (the same path as ``mpsearch search --space llama_wkv --context N``).
SmolLM2's weights are dequantized Q4_1: a 4-bit g32 weight format reproduces them exactly.

Writes ``benchmarks/results/joint.csv``: ``model, budget_bytes, context, allocation, ppl, kl``
plus the split the plan made (``weight_bytes, kv_bytes, weight_bits, kv_bits``), ``kl_lo/kl_hi``
(bootstrap over windows; over the decoded tokens' positions there is one window at 8k),
``dkl_best*`` (KL minus the better plan of the budget, paired CI), the predicted loss and the
unquantized model's ``reference_ppl`` on the same windows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from foundation import machine

from mpsearch.run.search import SearchConfig, search

OUT = Path(__file__).parent / "results"


def sizes(model: str) -> tuple[int, int]:
    """Decision weights of the llama_wkv space, and K + V elements per token.

    SmolLM2: 106,168,320 and 2 x 30 x 3 x 64."""
    from mpsearch.core.space import SearchSpace
    from mpsearch.models import load_model

    lm = load_model(model)
    c = lm.model.config
    weights = sum(m.numel for m in SearchSpace.from_file("llama_wkv").members(lm.model))
    return weights, 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=float, nargs="+", default=[3.5, 4.5])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--windows", type=int, nargs="+", default=[2, 1], help="evaluation windows per context")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--proxy",
        default="measured_kl",
        help="weight proxy; the run-time proxy is paired with it (measured_kl -> kl, fisher -> fisher)",
    )
    a = ap.parse_args()
    weights, kv_per_token = sizes(a.model)
    out = OUT / "joint.csv"
    rows = (
        pd.read_csv(out).query("model != @a.model").to_dict("records") if out.exists() else []
    )  # other models' rows stay
    for context, windows in zip(a.contexts, a.windows):
        budgets = [f"{round(b * (weights + kv_per_token * context) / 8)}B" for b in a.bits]
        res = search(
            SearchConfig(
                model=a.model,
                space="llama_wkv",
                proxies=(a.proxy,),
                budgets=tuple(budgets),
                context=context,
                decode=128,
                eval_chunks=windows,
                refine=0,
                baselines=False,
                threads=a.threads,
                out_dir=f"runs/joint-{a.model}-{context}",
            )
        )
        table = res.table.set_index("plan")
        ref = res.table[res.table.kind == "reference"].iloc[0]
        for name, plan in res.plans.items():
            m, t = plan.metrics, table.loc[name]
            rows.append(
                {
                    "model": a.model,
                    "proxy": a.proxy,
                    "budget_bytes": float(plan.budget["limit"]),
                    "context": context,
                    "allocation": plan.provenance["allocation"],
                    "ppl": m["ppl"],
                    "kl": m["kl"],
                    "kl_lo": t.kl_lo,
                    "kl_hi": t.kl_hi,
                    "dkl_best": t.dkl_best,
                    "dkl_best_lo": t.dkl_best_lo,
                    "dkl_best_hi": t.dkl_best_hi,
                    "weight_bytes": m["weight_bytes"],
                    "kv_bytes": m["kv_bytes"],
                    "weight_bits": m["effective_bits"],
                    "kv_bits": m["kv_bits"],
                    "predicted": m.get("predicted"),
                    "eval_windows": windows,
                    "mean_bits": float(plan.budget["limit"]) * 8 / (weights + kv_per_token * context),
                    "reference_ppl": ref.ppl,
                }
            )
        pd.DataFrame(rows).to_csv(out, index=False)
        print(pd.DataFrame(rows).to_string(), flush=True)
    meta = json.loads((OUT / "joint.json").read_text()) if (OUT / "joint.json").exists() else {}
    meta[a.model] = {
        "machine": machine(a.threads),
        "bits": a.bits,
        "contexts": a.contexts,
        "windows": a.windows,
        "decode": 128,
        "proxy": a.proxy,
    }
    (OUT / "joint.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
