"""Benchmark: the KV cache at 16, 8, 4, 3 and 2 bits per element, KVQuant against naive per-token.

    .venv/bin/python benchmarks/kv.py [--context 2048] [--windows 4] [--decode 128]

Every layer's K and V cache of SmolLM2 gets one format (weights stay as they are; the model's
weights are dequantized Q4_1, which does not touch the cache). Each plan is applied with
``mpsearch.quant.applied`` and measured on the inference path: each evaluation window of
``context`` Persuasion tokens is prefilled through the cache 1024 tokens at a time, then its
last ``decode`` tokens are decoded one at a time (:class:`mpsearch.measure.evaluate.DecodeEvaluator`);
ppl and KL(reference || quantized) are over those decoded tokens.

- ``naive-per-token``: ``kvtok``, asymmetric uniform per token and head, fp16 min and scale;
- ``kvquant``: pre-RoPE per-channel keys, per-token values, Fisher-weighted nuq codebook,
  1% dense-and-sparse outliers per vector, the first token in fp16 (calibrated on 8 x 512
  Sense and Sensibility tokens);
- ablations at 3 and 2 bits: ``kvquant-uniform`` (no codebook) and ``kvquant-no-outliers``.

Writes ``benchmarks/results/kv.csv``: ``model, method, kv_bits, context, ppl, kl`` plus the
exact ``bits_per_element`` at that context (every scale, zero, codebook, outlier and sink
counted), ``kl_lo/kl_hi`` (bootstrap over windows) and the seconds per plan.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from foundation import machine

from mpsearch.core.format import Format
from mpsearch.core.plan import Plan, fingerprint
from mpsearch.core.stats import mean_ci
from mpsearch.measure.evaluate import DecodeEvaluator
from mpsearch.models import load_model, load_text, token_chunks
from mpsearch.models.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION
from mpsearch.quant import applied
from mpsearch.quant.calibrate import calibrate
from mpsearch.quant.kvcache import bits_per_element

OUT = Path(__file__).parent / "results"


def methods(bits: int) -> dict[str, Format]:
    out = {"naive-per-token": Format.parse(f"kvtok{bits}"), "kvquant": Format.parse(f"kvquant{bits}")}
    if bits in (2, 3):
        kq = out["kvquant"]
        out["kvquant-uniform"] = replace(kq, params=tuple((k, False if k == "nuq" else v) for k, v in kq.params))
        out["kvquant-no-outliers"] = replace(kq, params=tuple(p for p in kq.params if p[0] != "outliers"))
    return out


def kv_plan(lm, fmt: Format, calib_tokens: torch.Tensor) -> Plan:
    model = lm.model
    layers = range(model.config.num_hidden_layers)
    sites = {
        (f"model.layers.{i}.self_attn.{p}", t): fmt
        for i in layers
        for p, t in (("k_proj", "k_cache"), ("v_proj", "v_cache"))
    }
    plan = Plan(lm.model_id, fingerprint(model), {n: {t: f} for (n, t), f in sites.items()})
    plan.calibration = calibrate(model, {s: [f] for s, f in sites.items()}, calib_tokens) or None
    return plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT / "kv.csv"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model("smollm2")
    cfg = lm.model.config
    width, head_dim = cfg.num_key_value_heads * cfg.head_dim, cfg.head_dim
    calib = token_chunks(lm.tokenizer, load_text(DEFAULT_CALIBRATION), 512, 8)
    tokens = token_chunks(lm.tokenizer, load_text(DEFAULT_EVALUATION), a.context, a.windows)
    ev = DecodeEvaluator(tokens, decode=a.decode, progress=False).fit(lm.model)
    rows = [
        {
            "model": "smollm2",
            "method": "reference",
            "kv_bits": 16,
            "context": a.context,
            "ppl": ev.reference_.ppl,
            "kl": 0.0,
            "bits_per_element": 16.0,
            "kl_lo": 0.0,
            "kl_hi": 0.0,
            "seconds": float("nan"),
        }
    ]
    print(rows[0], flush=True)
    done = pd.read_csv(a.out) if Path(a.out).exists() else pd.DataFrame(columns=["method", "kv_bits", "context"])
    done = done[
        (done.context == a.context) & (done.method != "reference")
    ]  # a rerun resumes: rows already measured stay
    rows += done.to_dict("records")
    for bits in (8, 4, 3, 2):
        for method, fmt in methods(bits).items():
            if ((done.method == method) & (done.kv_bits == bits)).any():
                continue
            t = time.perf_counter()
            plan = kv_plan(lm, fmt, calib)
            with applied(lm.model, plan) as model:
                q = ev.score(model)
            lo, hi = mean_ci(q.kl_windows)
            bpe = (
                bits_per_element(fmt, "k_cache", a.context, width, head_dim)
                + bits_per_element(fmt, "v_cache", a.context, width, head_dim)
            ) / 2
            rows.append(
                {
                    "model": "smollm2",
                    "method": method,
                    "kv_bits": bits,
                    "context": a.context,
                    "ppl": q.ppl,
                    "kl": q.kl,
                    "bits_per_element": bpe,
                    "kl_lo": lo,
                    "kl_hi": hi,
                    "seconds": time.perf_counter() - t,
                    "format": fmt.key,
                }
            )
            print(rows[-1], flush=True)
            pd.DataFrame(rows).to_csv(a.out, index=False)
    meta = {
        "machine": machine(a.threads),
        "context": a.context,
        "windows": a.windows,
        "decode": a.decode,
        "calibration": f"{DEFAULT_CALIBRATION}: 8 x 512 tokens",
        "evaluation": f"{DEFAULT_EVALUATION}: {a.windows} windows of {a.context} tokens, the last {a.decode} decoded "
        "through the cache",
    }
    Path(a.out).with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
