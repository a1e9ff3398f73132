"""Benchmark: every built-in proxy's MILP plan on the default model (or ``--model
gemma3-270m``, results then in proxies_gemma3-270m.*), and what each primitive costs.

    .venv/bin/python benchmarks/proxies.py [--threads 2] [--time-kl] [--model gemma3-270m]

1. Each primitive family (gradients, activations, hessian, synflow) is computed afresh
   in its own process on the default calibration (8 x 512 tokens of Pride and
   Prejudice), so its wall time and peak resident memory are its own; the results go
   to the cache the search then reads. The measured-KL sensitivity (2,910 tensor-format
   pairs, about half an hour) is timed only with ``--time-kl``; otherwise it comes from
   the cache (or is computed inside the search).
2. One search: every built-in proxy's MILP plan at the effective bits of uniform 3-bit
   (3.5) and uniform 4-bit (4.5), next to uniform and the llama.cpp-style recipe, all
   measured (perplexity, KL to the unquantized model) on 8,192 tokens of Persuasion.

The plans are the proxies' own MILP plans (no measured refinement), so the table ranks
the proxies, not the search that guards them.

Writes benchmarks/results/proxies[_MODEL].{csv,md,json} and proxies_primitives[_MODEL].csv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
from foundation import RESULTS, machine  # noqa: E402  (same folder)

BUDGETS = ("uniform:3", "uniform:4")


def suffix(model: str) -> str:
    return "" if model == "smollm2" else f"_{model}"


def time_family(name: str, threads: int, out: Path, model: str) -> None:
    """Child process: compute one family afresh (or the measured KL) and write its stage record."""
    import torch

    from mpsearch.core.profiling import Stages
    from mpsearch.core.space import SearchSpace
    from mpsearch.models import load_model, load_text, token_chunks
    from mpsearch.models.data import DEFAULT_CALIBRATION, conventions
    from mpsearch.primitives import compute_primitives, families, weights_hash
    from mpsearch.primitives.sensitivity import measured_kl
    from mpsearch.run.session import KL_SLICE

    torch.set_num_threads(threads)
    lm = load_model(model)
    decisions = SearchSpace.from_file("llama").build(lm.model)
    tensors = [m.name for d in decisions for m in d.members]
    # the windows the search builds (BOS where the tokenizer adds one), so the cache entries are the search's
    lead = conventions(lm.tokenizer)["calibration_leading"]
    calib = token_chunks(lm.tokenizer, load_text(DEFAULT_CALIBRATION), 512, 8, lead=lead)
    stages = Stages()
    if name == "measured_kl":
        with stages("primitives: measured_kl"):
            measured_kl(
                lm.model,
                decisions,
                calib[: KL_SLICE[0], : KL_SLICE[1]],
                weights_hash(lm.model),
                use_cache=True,
                progress=True,
            )
    else:
        compute_primitives(
            lm.model, tensors, calib, set(families()[name].provides), progress=True, stages=stages, refresh=True
        )
    out.write_text(json.dumps(stages.records[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--time-kl", action="store_true", help="also time the measured-KL pass (clear its cache first to time it cold)"
    )
    ap.add_argument("--skip-timing", action="store_true", help="reuse cached primitives; only run the search")
    ap.add_argument("--family", help=argparse.SUPPRESS)  # internal: run one family in this process
    ap.add_argument("--record", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.family:
        time_family(a.family, a.threads, Path(a.record), a.model)
        return

    from mpsearch.primitives import families
    from mpsearch.proxies import list_proxies
    from mpsearch.run.search import SearchConfig, search

    RESULTS.mkdir(parents=True, exist_ok=True)
    records = []
    if not a.skip_timing:
        for name in [*families(), *(["measured_kl"] if a.time_kl else [])]:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--family",
                        name,
                        "--record",
                        f.name,
                        "--threads",
                        str(a.threads),
                        "--model",
                        a.model,
                    ],
                    check=True,
                )
                rec = json.loads(Path(f.name).read_text())
            records.append(
                {
                    "family": name,
                    "provides": ", ".join(families()[name].provides) if name in families() else "kl",
                    "seconds": rec["seconds"],
                    "peak_rss_mb": rec["peak_rss_mb"],
                    "rss_before_mb": rec["rss_before_mb"],
                }
            )
            print(records[-1], flush=True)
        pd.DataFrame(records).to_csv(RESULTS / f"proxies_primitives{suffix(a.model)}.csv", index=False)

    proxies = tuple(list_proxies())
    res = search(
        SearchConfig(
            model=a.model,
            proxies=proxies,
            budgets=BUDGETS,
            threads=a.threads,
            refine=0,
            out_dir=str(RESULTS / f"proxies_run{suffix(a.model)}"),
        )
    )
    table = res.table
    out = RESULTS / f"proxies{suffix(a.model)}"
    table.to_csv(out.with_suffix(".csv"), index=False)
    out.with_suffix(".md").write_text(summary(table, proxies))
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "machine": machine(a.threads),
                "model": a.model,
                "budgets": BUDGETS,
                "primitives": records,
                "stages": res.stages.to_dict("records"),
            },
            indent=1,
        )
    )
    print(summary(table, proxies))


def summary(table: pd.DataFrame, proxies: tuple[str, ...]) -> str:
    """One row per method: effective bits, ppl and KL at each budget."""
    rows = []
    ref = table[table.kind == "reference"].iloc[0]
    methods = [(p, f"{p}-milp@") for p in proxies] + [("uniform", "uniform-"), ("recipe", "recipe@")]
    for label, prefix in methods:
        cells = [label]
        for b in BUDGETS:
            hit = table[table.plan.str.startswith(prefix) & (table.budget == b)]
            if hit.empty:
                cells += ["-", "-", "-"]
                continue
            r = hit.iloc[0]
            cells += [f"{r.effective_bits:.3f}", f"{r.ppl:.2f}", f"{r.kl:.4f}"]
        rows.append(cells)
    head = ["method"] + [f"{col} @{b}" for b in BUDGETS for col in ("bits", "ppl", "KL")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    return f"Reference (unquantized) ppl {ref.ppl:.2f}.\n\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
