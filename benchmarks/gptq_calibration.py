"""Benchmark: how many calibration tokens GPTQ's Gram matrix needs before it generalizes.

    .venv/bin/python benchmarks/gptq_calibration.py [--model smollm2] [--windows 8 32 64 128]

GPTQ fits each layer's whole input Gram matrix ``H = X^T X / n`` (``[in, in]``). With
8 x 512 calibration tokens (what the diagonal primitives use) a 1536-wide ``down_proj``
has under 3 tokens per column, and GPTQ overfits: its output error on held-out text can
exceed plain RTN's. This measures, for a few layers, the output error
``trace(dW H_eval dW^T)`` on held-out text (Persuasion, 16 x 512 tokens) of RTN, clipped
RTN and GPTQ (act-order and not, two dampings) with ``H`` fitted on the first N x 512
tokens of the calibration text (Pride and Prejudice). It is why a search fits the Gram
matrix on ``SearchConfig.gram_chunks`` (64) windows.

Writes benchmarks/results/gptq_calibration.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import RESULTS  # noqa: E402

from mpsearch.core.format import Format  # noqa: E402
from mpsearch.models import load_model, load_text, token_chunks  # noqa: E402
from mpsearch.models.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, conventions  # noqa: E402
from mpsearch.quant import quantize  # noqa: E402

LAYERS = (
    "model.layers.3.self_attn.q_proj",
    "model.layers.3.mlp.down_proj",
    "model.layers.10.mlp.down_proj",
    "model.layers.20.mlp.gate_proj",
    "model.layers.20.mlp.down_proj",
)


def grams(model, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X / n of each named linear's input over ``windows``, in float64."""
    mods = dict(model.named_modules())
    acc = {n: torch.zeros(mods[n].in_features, mods[n].in_features, dtype=torch.float64) for n in names}

    def hook(name):
        def f(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc[name] += x.T @ x

        return f

    hs = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for seq in windows:
            model(input_ids=seq[None])
    for h in hs:
        h.remove()
    return {n: a / windows.numel() for n, a in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, nargs="+", default=[8, 32, 64, 128])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    lm = load_model(a.model)
    lead = conventions(lm.tokenizer)
    mods = dict(lm.model.named_modules())
    names = [n for n in LAYERS if n in mods]
    calib = token_chunks(
        lm.tokenizer, load_text(DEFAULT_CALIBRATION), 512, max(a.windows), lead=lead["calibration_leading"]
    )
    held = grams(
        lm.model,
        names,
        token_chunks(lm.tokenizer, load_text(DEFAULT_EVALUATION), 512, 16, lead=lead["evaluation_leading"]),
    )
    fitted = {k: grams(lm.model, names, calib[:k]) for k in a.windows}
    rows = []
    for n in names:
        w = mods[n].weight.detach().float()

        def err(q: torch.Tensor) -> float:
            d = (q - w).double()
            return float(torch.einsum("ij,jk,ik->", d, held[n], d))

        for b in a.bits:
            rtn = err(quantize(w, Format(b, 64, False, "uniform")))
            base = {"model": a.model, "tensor": n, "bits": b, "rtn_error": rtn}
            few = min(a.windows)  # the clip baseline's imatrix, from the fewest windows
            clip = err(quantize(w, Format(b, 64, False, "clip"), torch.diagonal(fitted[few][n]).float()))
            rows.append({**base, "method": "clip", "windows": few, "damp": None, "error": clip, "vs_rtn": clip / rtn})
            for k, h in fitted.items():
                for act in (False, True):
                    for damp in (0.01, 0.1):
                        e = err(
                            quantize(
                                w, Format(b, 64, False, "gptq", (("act_order", act), ("damp", damp))), h[n].float()
                            )
                        )
                        rows.append(
                            {
                                **base,
                                "method": "gptq" + (" act-order" if act else ""),
                                "windows": k,
                                "damp": damp,
                                "error": e,
                                "vs_rtn": e / rtn,
                            }
                        )
        print(n, flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(
        RESULTS / ("gptq_calibration" + ("" if a.model == "smollm2" else f"_{Path(a.model).stem}") + ".csv"),
        index=False,
    )
    summary = (
        table[table.method != "clip"].groupby(["method", "windows", "damp", "bits"]).vs_rtn.median().unstack("bits")
    )
    print(f"median held-out output error / RTN's over {len(names)} layers ({time.perf_counter() - t0:.0f} s):")
    print(summary.round(3).to_string())


if __name__ == "__main__":
    main()
