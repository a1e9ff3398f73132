"""Benchmark: the foundation search on the embedded default model (SmolLM2-135M), or on
``--model gemma3-270m`` (results then in foundation_gemma3-270m.*).

Perplexity and KL on held-out text (Persuasion) for uniform 3- and 4-bit, the
llama.cpp-style recipe (at its own 3/5- and 4/6-bit sizes, and squeezed to the uniform
sizes), and MILP plans of the mse, fisher and input_moment proxies at each of those effective bits
(calibrated on Pride and Prejudice); wall time and memory of each stage. Writes
benchmarks/results/foundation.{json,csv,md}.

    .venv/bin/python benchmarks/foundation.py [--threads 2] [--eval-chunks 16] [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from mpsearch.core.files import write_json_atomic
from mpsearch.run.search import SearchConfig, search

RESULTS = Path(__file__).resolve().parent / "results"
#: the foundation's three proxies; benchmarks/proxies.py compares every built-in one
FOUNDATION_PROXIES = ("mse", "fisher", "input_moment")


def machine(threads: int) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def markdown(table) -> str:
    cols = ["plan", "effective_bits", "ppl", "kl"] + sorted(c for c in table if c.startswith("predicted_"))
    t = table[cols]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return head + "".join("| " + " | ".join(fmt(v) for v in row) + " |\n" for row in t.itertuples(index=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-chunks", type=int, default=8)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--out", default=None, help="results path without suffix (default benchmarks/results/foundation[_MODEL])"
    )
    ap.add_argument(
        "--reuse-cache", action="store_true", help="use ~/.cache/mpsearch (stage timings then show cache hits)"
    )
    a = ap.parse_args()
    if not a.reuse_cache:  # a fresh cache, so every stage's time and memory is real work
        os.environ["MPSEARCH_CACHE"] = tempfile.mkdtemp(prefix="mpsearch-bench-")
    cfg = SearchConfig(
        model=a.model,
        proxies=FOUNDATION_PROXIES,
        refine=0,
        budgets=("uniform:3", "uniform:4", "recipe:3", "recipe:4"),
        threads=a.threads,
        calib_chunks=a.calib_chunks,
        calib_seq_len=a.seq_len,
        eval_chunks=a.eval_chunks,
        eval_seq_len=a.seq_len,
        out_dir=str(RESULTS / ("foundation_run" if a.model == "smollm2" else f"foundation_run_{a.model}")),
    )
    t0 = time.perf_counter()
    res = search(cfg)
    total = time.perf_counter() - t0
    ref = res.table[res.table.kind == "reference"]
    table = pd.concat([ref, res.table[res.table.kind != "reference"].sort_values(["budget", "ppl"])])
    out = Path(a.out or RESULTS / ("foundation" if a.model == "smollm2" else f"foundation_{a.model}"))
    table.to_csv(out.with_suffix(".csv"), index=False)
    write_json_atomic(
        out.with_suffix(".json"),
        {
            "machine": machine(a.threads),
            "settings": {
                "model": a.model,
                "calibration": cfg.calibration,
                "calib_tokens": cfg.calib_chunks * cfg.calib_seq_len,
                "evaluation": cfg.evaluation,
                "eval_tokens": cfg.eval_chunks * cfg.eval_seq_len,
                "space": cfg.space,
            },
            "total_seconds": round(total, 1),
            "results": json.loads(table.to_json(orient="records")),
            "stages": json.loads(res.stages.to_json(orient="records")),
        },
    )
    md = markdown(table)
    stages = res.stages[["stage", "seconds", "rss_before_mb", "rss_after_mb", "peak_rss_mb"]].to_string(index=False)
    out.with_suffix(".md").write_text(
        f"{md}\nStages (wall seconds; resident MB before, after, and peak during the stage):\n\n```\n{stages}\n```\n"
    )
    print(md)
    print(stages)
    print(f"\ntotal {total:.0f} s; wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
