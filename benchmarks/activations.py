"""Benchmark: W8A8 and W4A8 (and A6, A4) with and without CrossQuant, with quantization-kernel proportions.

    .venv/bin/python benchmarks/activations.py [--windows 8] [--seq-len 512]

Every decision linear of SmolLM2 (the llama space's 210) gets the weight format (W8: 8-bit
per output channel; W4: 4-bit in groups of 64, 4.5 bits; both asymmetric RTN) and its input one
activation format:

- ``fp16``: weights only;
- ``tensor``: per-tensor static scale calibrated on 8 x 512 Sense and Sensibility tokens;
- ``tok``: per-token dynamic absmax;
- ``cross``: CrossQuant (token absmax^0.15 x calibrated channel absmax^0.85).

Measured on ``windows`` x ``seq-len`` Persuasion tokens (full-sequence forward; no KV cache
quantized). The kernel proportion is the share of nonzero input elements that round to
zero, over every decision layer; per layer it goes to ``activations_kernel.csv``.
SmolLM2's weights are dequantized Q4_1: the W4 rows start from weights on a 4-bit grid in groups of 32, which g64 does
not reproduce.

Writes ``benchmarks/results/activations.csv``: ``model, weights, activations, method, act_bits,
ppl, kl, kl_lo, kl_hi, kernel_proportion`` and ``activations_kernel.csv``: ``weights, activations,
layer, kernel_proportion``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch
from foundation import machine

from mpsearch.core.format import Format
from mpsearch.core.plan import Plan, fingerprint
from mpsearch.core.space import SearchSpace
from mpsearch.core.stats import mean_ci
from mpsearch.measure.evaluate import evaluator_for
from mpsearch.models import load_model, load_text, token_chunks
from mpsearch.models.batches import as_batches
from mpsearch.models.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION
from mpsearch.quant import applied
from mpsearch.quant.calibrate import calibrate

OUT = Path(__file__).parent / "results"
WEIGHTS = {"W8": "u8gcha", "W4": "u4g64a"}
ACTS = ["fp16", "tensor8", "tok8", "cross8", "tok6", "cross6", "tok4", "cross4"]
METHOD = {"fp16": "none", "tensor": "per-tensor static", "tok": "per-token dynamic", "cross": "CrossQuant"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model("smollm2")
    model = lm.model
    names = [m.name for m in SearchSpace.from_file("llama").members(model)]
    calib = token_chunks(lm.tokenizer, load_text(DEFAULT_CALIBRATION), 512, 8)
    ev = as_batches(token_chunks(lm.tokenizer, load_text(DEFAULT_EVALUATION), a.seq_len, a.windows))
    ev = evaluator_for(ev, progress=False).fit(model)
    acts = {k: Format.parse(k) for k in ACTS}
    calibration = calibrate(model, {(n, "input"): [f for f in acts.values() if not f.is_full] for n in names}, calib)
    rows, kernel_rows = [], []
    for wname, wkey in WEIGHTS.items():
        for akey, af in acts.items():
            tensors = {n: {"weight": Format.parse(wkey), **({} if af.is_full else {"input": af})} for n in names}
            plan = Plan(
                lm.model_id,
                fingerprint(model),
                tensors,
                calibration=None if af.is_full else {k: v for k, v in calibration.items() if f"/input/{akey}/" in k},
            )
            with applied(model, plan) as m:
                q = ev.score(m)
                hooks = getattr(m, "_mpsearch_runtime", None)
                kernel = dict(hooks.kernel) if hooks is not None else {}
            zeros, nonzero = sum(z for z, _ in kernel.values()), sum(n for _, n in kernel.values())
            lo, hi = mean_ci(q.kl_windows)
            rows.append(
                {
                    "model": "smollm2",
                    "weights": f"{wname} ({wkey})",
                    "activations": akey,
                    "method": METHOD[af.quantizer if not af.is_full else "fp16"],
                    "act_bits": af.bits,
                    "ppl": q.ppl,
                    "kl": q.kl,
                    "kl_lo": lo,
                    "kl_hi": hi,
                    "kernel_proportion": zeros / nonzero if nonzero else 0.0,
                }
            )
            kernel_rows += [
                {"weights": wname, "activations": akey, "layer": n, "kernel_proportion": z / c if c else 0.0}
                for (n, _), (z, c) in kernel.items()
            ]
            print(rows[-1], flush=True)
            pd.DataFrame(rows).to_csv(OUT / "activations.csv", index=False)
            pd.DataFrame(kernel_rows).to_csv(OUT / "activations_kernel.csv", index=False)
    (OUT / "activations.json").write_text(
        json.dumps(
            {
                "machine": machine(a.threads),
                "reference_ppl": ev.reference_.ppl,
                "evaluation": f"{DEFAULT_EVALUATION}: {a.windows} x {a.seq_len} tokens",
                "calibration": f"{DEFAULT_CALIBRATION}: 8 x 512 tokens",
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
