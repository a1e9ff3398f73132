"""Benchmark: the quick start's search, cold: the embedded SmolLM2-135M, Fisher proxy,
uniform-3-bit budget, baselines, measured refinement, all defaults, on an empty cache
(so the GGUF conversion and every primitive count). Writes benchmarks/results/default_search.json
with the wall time, the peak resident memory and every stage.

    .venv/bin/python benchmarks/default_search.py [--threads 2] [--model smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from foundation import RESULTS, machine  # noqa: E402

from mpsearch.core.files import write_json_atomic
from mpsearch.run.search import SearchConfig, search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2")
    a = ap.parse_args()
    os.environ["MPSEARCH_CACHE"] = tempfile.mkdtemp(prefix="mpsearch-bench-")
    t0 = time.perf_counter()
    res = search(
        SearchConfig(
            model=a.model, threads=a.threads, progress=False, out_dir=str(RESULTS / f"default_search_run_{a.model}")
        )
    )
    total = time.perf_counter() - t0
    name = "default_search" if a.model == "smollm2" else f"default_search_{a.model}"
    out = {
        "machine": machine(a.threads),
        "model": a.model,
        "total_seconds": round(total, 1),
        "peak_rss_mb": float(res.stages.peak_rss_mb.max()),
        "summary": res.summary,
        "results": json.loads(res.table.to_json(orient="records")),
        "stages": json.loads(res.stages.to_json(orient="records")),
    }
    write_json_atomic(RESULTS / f"{name}.json", out)
    print(res.stages.to_string(index=False))
    print(f"total {total:.0f} s, peak {out['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
