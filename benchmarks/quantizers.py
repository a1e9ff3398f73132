"""Benchmark: every quantizer at 2, 3 and 4 bits, the same format on every block linear.

    .venv/bin/python benchmarks/quantizers.py [--model smollm2] [--threads 2]

Uniform RTN, clipped RTN, GPTQ (in column order or act-order with static groups; group ranges
by min/max or by the clipping search, mpsearch's default), the non-uniform quantizers
(NormalFloat, AdaLog-style log, POST's sqrt(2) table, NUPES, importance-weighted k-means
per row), dense-and-sparse outlier retention (0.5% of the weights kept in fp16, their
indices counted in the bits) and the GGUF types that fit every tensor, each applied to all block linears
and measured with mpsearch's evaluator (perplexity, KL to the reference on 16 x 512
tokens of Persuasion). Importance vectors (the imatrix) come from the calibration text
(Pride and Prejudice, 8 x 512 tokens), GPTQ's Gram matrices from its first 64 x 512
tokens (``--gram-chunks``; 8 windows make GPTQ overfit). Groups of 64 (row
width 576 is not a multiple of 128). On SmolLM2 the reference weights lie on a 4-bit
grid with groups of 32 (Q4_1), which favours 4-bit formats of that shape.

Writes benchmarks/results/quantizers[_MODEL].{csv,md,json}, the CSV after every row: an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import RESULTS, machine  # noqa: E402

from mpsearch.core.format import Format  # noqa: E402
from mpsearch.core.space import SearchSpace  # noqa: E402
from mpsearch.cost import plan_bits  # noqa: E402
from mpsearch.measure.evaluate import Evaluator  # noqa: E402
from mpsearch.models import load_model, load_text, token_chunks  # noqa: E402
from mpsearch.models.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, conventions  # noqa: E402
from mpsearch.primitives import compute_primitives  # noqa: E402
from mpsearch.quant import get_quantizer, quantize  # noqa: E402
from mpsearch.run.search import SearchConfig  # noqa: E402

#: (label, key template) per quantizer; {b} is the bits
METHODS = (
    ("uniform RTN", "u{b}g64a"),
    ("clipped RTN", "clip{b}g64a"),
    ("GPTQ, min/max ranges", "gptq{b}g64a"),
    ("GPTQ, act-order, min/max ranges", "gptq{b}g64a+act"),
    ("GPTQ, act-order, clipped ranges (default)", "gptq{b}g64a+act+clip"),
    ("NormalFloat", "nf{b}g64s"),
    ("log, searched base (AdaLog)", "log{b}g64s"),
    ("sqrt(2) table (POST)", "post{b}g64s"),
    ("power grid (NUPES)", "nupes{b}g64s"),
    ("k-means per row, weighted", "kmeans{b}gchs"),
    ("RTN + 0.5% fp16 outliers", "u{b}g64a+o0.5"),
    ("k-means + 0.5% fp16 outliers (SqueezeLLM)", "kmeans{b}gchs+o0.5"),
)
GGUF = {2: ("q2_k",), 3: ("q3_k", "iq3_s"), 4: ("q4_0", "iq4_nl", "q4_k", "iq4_xs")}


def fmt_of(template: str, bits: int) -> Format:
    key = template.format(b=bits)
    if key.endswith("+act+clip"):  # mpsearch's default GPTQ
        return Format(bits, 64, False, "gptq", (("act_order", True), ("clip", True)))
    if key.endswith("+act"):
        return Format(bits, 64, False, "gptq", (("act_order", True), ("clip", False)))
    if key.startswith("gptq"):
        return Format(bits, 64, False, "gptq", (("act_order", False), ("clip", False)))
    return Format.parse(key)


def with_earlier(rows: list[dict], done: pd.DataFrame) -> pd.DataFrame:
    """This run's rows, then the earlier run's rows this run did not measure (``--only``)."""
    return pd.concat([pd.DataFrame(rows), done[~done.format.isin([r["format"] for r in rows])]], ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--gram-chunks",
        type=int,
        default=SearchConfig.gram_chunks,
        help="calibration windows GPTQ's Gram matrix is fitted on (default: the search's)",
    )
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        metavar="LABEL",
        help="run only the quantizers whose label starts with one of these (the CSV keeps earlier rows)",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    lm = load_model(a.model)
    lead = conventions(lm.tokenizer)
    members = [m for d in SearchSpace.from_file("llama").build(lm.model) for m in d.members]
    modules = dict(lm.model.named_modules())
    calib = token_chunks(lm.tokenizer, load_text(DEFAULT_CALIBRATION), 512, 8, lead=lead["calibration_leading"])
    evalt = token_chunks(lm.tokenizer, load_text(DEFAULT_EVALUATION), 512, 16, lead=lead["evaluation_leading"])
    names = [m.name for m in members]
    imp = compute_primitives(lm.model, names, calib, {"xtx"}, progress=False).xtx  # the imatrix; cached
    # GPTQ's Gram matrix on gram_chunks windows, as a search fits it (SearchConfig.gram_chunks)
    gram_windows = token_chunks(
        lm.tokenizer, load_text(DEFAULT_CALIBRATION), 512, a.gram_chunks, lead=lead["calibration_leading"]
    )
    gram = compute_primitives(lm.model, names, gram_windows, {"gram"}, progress=False).gram
    ev = Evaluator(evalt, progress=False).fit(lm.model)
    print(f"reference ppl {ev.reference_.ppl:.3f}; statistics in {time.perf_counter() - t0:.0f} s", flush=True)
    original = {m.name: modules[m.name].weight.detach().clone() for m in members}
    out = RESULTS / ("quantizers" if a.model == "smollm2" else f"quantizers_{Path(a.model).stem}")
    rows = [
        {
            "model": a.model,
            "quantizer": "reference",
            "format": "-",
            "bits": 32,
            "bpw": 32.0,
            "ppl": ev.reference_.ppl,
            "kl": 0.0,
            "seconds_to_quantize": 0.0,
        }
    ]
    # resumable: rows measured by an earlier, interrupted run of the same model are kept
    done = (
        pd.read_csv(out.with_suffix(".csv"))
        if out.with_suffix(".csv").exists()
        else pd.DataFrame(columns=["model", "quantizer", "format"])
    )
    done = done[(done.model == a.model) & (done.quantizer != "reference")]
    jobs = [(label, fmt_of(t, b), b) for b in (2, 3, 4) for label, t in METHODS]
    jobs += [(f"GGUF {k.upper()} (imatrix)", Format.parse(k), b) for b, keys in GGUF.items() for k in keys]
    if a.only is not None:
        jobs = [j for j in jobs if any(j[0].startswith(o) for o in a.only)]
    for label, fmt, bits in jobs:
        if not all(fmt.fits(m.in_features) for m in members):
            continue
        key = (
            fmt.key
            + (", act-order" if dict(fmt.params).get("act_order") else "")
            + (", clipped" if dict(fmt.params).get("clip") else "")
        )
        if key in set(done.get("format", ())):
            rows.append(done[done.format == key].iloc[0].to_dict())
            continue
        q = get_quantizer(fmt.quantizer)
        t1 = time.perf_counter()
        with torch.no_grad():
            for m in members:
                extra = gram[m.name] if fmt.quantizer == "gptq" else (imp[m.name] if q.reads_importance(fmt) else None)
                modules[m.name].weight.copy_(quantize(original[m.name], fmt, extra))
        seconds = time.perf_counter() - t1
        res = ev.score(lm.model, desc=fmt.key)
        with torch.no_grad():
            for m in members:
                modules[m.name].weight.copy_(original[m.name])
        rows.append(
            {
                "model": a.model,
                "quantizer": label,
                "format": key,
                "bits": bits,
                "bpw": plan_bits({m.name: fmt for m in members}, members),
                "ppl": res.ppl,
                "kl": res.kl,
                "seconds_to_quantize": round(seconds, 1),
            }
        )
        print(rows[-1], flush=True)
        with_earlier(rows, done).to_csv(out.with_suffix(".csv"), index=False)
    table = with_earlier(rows, done)
    table.to_csv(out.with_suffix(".csv"), index=False)
    md = ["| quantizer | format | bpw | ppl | KL |", "|---|---|---|---|---|"]
    md += [f"| {r.quantizer} | {r.format} | {r.bpw:.3f} | {r.ppl:.2f} | {r.kl:.4f} |" for r in table.itertuples()]
    out.with_suffix(".md").write_text(__doc__.split("\n\n")[1] + "\n\n" + "\n".join(md) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            {"machine": machine(a.threads), "model": a.model, "total_seconds": round(time.perf_counter() - t0, 1)},
            indent=1,
        )
    )
    print("\n".join(md))


if __name__ == "__main__":
    main()
