"""Benchmark: mpsearch's GGUF quantization against llama-quantize's, tensor by tensor.

    .venv/bin/python benchmarks/ggml_vs_llamacpp.py [--model smollm2] [--work DIR]

Needs the folder ``benchmarks/llamacpp.py --work DIR`` leaves behind (the all-F32
reference GGUF and llama-imatrix's ``imatrix.gguf``). For each GGML type, llama-quantize
writes the model with that type wherever it fits (its own fallback elsewhere), and
mpsearch quantizes the same tensors to the same type from the same F32 weights with
the same imatrix (llama-imatrix's per-column mean square). Both are scored by the
imatrix-weighted squared error ``sum(imatrix * (q - w)^2)`` over the tensors of that
type, the error both searches minimise. This separates the quantizers from the
allocation: a KL gap between files of equal size is then the allocation's doing.

Writes benchmarks/results/ggml_vs_llamacpp.csv (model, type, tensors, numel,
llama_cpp_error, mpsearch_error, ratio).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import RESULTS  # noqa: E402
from llamacpp import BLOCK_LINEAR  # noqa: E402
from llamacpp_tools import VERSION, build  # noqa: E402

from mpsearch.core.format import Format  # noqa: E402
from mpsearch.quant import quantize  # noqa: E402

#: preset -> the type it writes where the rows allow
PRESETS = {
    "Q4_0": "q4_0",
    "Q4_1": "q4_1",
    "IQ4_NL": "iq4_nl",
    "Q5_0": "q5_0",
    "Q8_0": "q8_0",
    "IQ4_XS": "iq4_xs",
    "Q3_K_S": "q3_k",
    "IQ3_S": "iq3_s",
    "Q2_K": "q2_k",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--work",
        default=None,
        help="benchmarks/llamacpp.py's --work folder (default ~/.cache/mpsearch/bench/llamacpp-MODEL)",
    )
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work or Path.home() / ".cache" / "mpsearch" / "bench" / f"llamacpp-{a.model}")
    ref_path, im_path = work / "reference-f32.gguf", work / "imatrix.gguf"
    for p in (ref_path, im_path):
        if not p.exists():
            raise SystemExit(f"{p} is missing: run benchmarks/llamacpp.py --model {a.model} --work {work} first")
    bins = build(VERSION, a.threads)
    imatrix = {t.name: np.array(t.data, dtype=np.float64).reshape(-1) for t in gguf.GGUFReader(im_path).tensors}
    ref = {t.name: t for t in gguf.GGUFReader(ref_path).tensors if BLOCK_LINEAR.search(t.name)}
    rows = []
    for preset, key in PRESETS.items():
        out = work / f"types-{preset}.gguf"
        subprocess.run(
            [
                str(bins / "llama-quantize"),
                "--imatrix",
                str(im_path),
                "--token-embedding-type",
                "f32",
                "--output-tensor-type",
                "f32",
                str(ref_path),
                str(out),
                preset,
                str(a.threads),
            ],
            check=True,
            capture_output=True,
        )
        theirs = {t.name: t for t in gguf.GGUFReader(out).tensors if t.name in ref}
        want = gguf.GGMLQuantizationType[key.upper()]
        err_l = err_m = 0.0
        n = numel = 0
        for name, t in theirs.items():
            if t.tensor_type != want:
                continue
            r = ref[name]
            shape = tuple(int(s) for s in reversed(r.shape))
            w = torch.from_numpy(np.array(r.data, dtype=np.float32).reshape(shape))
            imp = torch.from_numpy((imatrix[name + ".in_sum2"] / imatrix[name + ".counts"][0]).astype(np.float32))
            lq = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
            mq = quantize(w, Format.parse(key), imp)
            err_l += float((((lq - w) ** 2) * imp).double().sum())
            err_m += float((((mq - w) ** 2) * imp).double().sum())
            n += 1
            numel += w.numel()
        out.unlink()
        rows.append(
            {
                "model": a.model,
                "type": key,
                "tensors": n,
                "numel": numel,
                "llama_cpp_error": err_l,
                "mpsearch_error": err_m,
                "ratio": err_m / err_l if err_l else None,
            }
        )
        print(rows[-1], flush=True)
    path = RESULTS / "ggml_vs_llamacpp.csv"
    old = pd.read_csv(path) if path.exists() else None
    new = pd.DataFrame(rows)
    table = new if old is None else pd.concat([old[old.model != a.model], new], ignore_index=True)
    table.to_csv(path, index=False)
    print(table[table.model == a.model].to_string(index=False))


if __name__ == "__main__":
    main()
