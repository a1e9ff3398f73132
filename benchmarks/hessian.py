"""Benchmark: per-tensor Hutchinson Hessian traces, ours against PyHessian, same probes and data.

Model SmolLM2-135M, its 210 decision linears; 4 sequences x 256 tokens of Pride and
Prejudice; Rademacher probes (same count both sides, hence the same variance).

- ours: ``mpsearch.primitives.hessian.hutchinson`` (one graph, probes batched through
  autograd, per-tensor traces and the diagonal in the same pass);
- PyHessian 0.1 (installed here only, ``pip install --no-deps pyhessian==0.1``): its
  ``hessian`` object on the same weights (requires_grad on the decision weights only),
  its ``hessian_vector_product`` per probe, per-tensor ``v . Hv`` taken from its Hv (its
  ``trace()`` returns only the total, so per-tensor traces need this).

Each side runs in a fresh process. Reports time and peak memory of each, the ratio,
and agreement of the per-tensor estimates (z-scores of the difference).

    .venv/bin/python benchmarks/hessian.py [--probes 8] [--threads 2]
    .venv/bin/python benchmarks/hessian.py --mode dataloader [--sequences 8] [--probes-ours 2] [--probes 4]

``--mode dataloader`` is the setting of the ``hessian`` primitive: more tokens than fit
one graph (8 x 256 here). PyHessian's ``dataloader_hv_product`` rebuilds every
batch's graph for every probe and uses one probe for the whole data; ours builds each
sequence's graph once, draws independent probes per sequence and reuses the graph.
With ``--shared`` ours uses PyHessian's estimator (one probe for all the data) and
still builds each graph once. The comparison is at equal variance: per tensor,
``(time x SE^2)`` of each side (the time each needs to reach a given standard error),
and the median over tensors of PyHessian's over ours.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

import numpy as np
import torch
from foundation import RESULTS, machine  # noqa: E402  (same folder)
from torch import nn

from mpsearch.core.files import write_json_atomic
from mpsearch.core.profiling import Stages
from mpsearch.core.space import SearchSpace
from mpsearch.models import load_model, load_text, token_chunks
from mpsearch.primitives.hessian import hutchinson


def pyhessian():
    try:
        return importlib.import_module("pyhessian")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "pyhessian==0.1"], check=True)
        return importlib.import_module("pyhessian")


class Logits(nn.Module):
    """PyHessian calls model(inputs) and criterion(outputs, targets): next-token logits, flattened."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=ids, use_cache=False).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


def grads_on_decisions_only(model: nn.Module, names: list[str]) -> None:
    """PyHessian differentiates every parameter with requires_grad: only the decision weights, as ours."""
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        modules[n].weight.requires_grad_(True)


def run_side(
    side: str, probes: int, batch: int, threads: int, mode: str = "batch", sequences: int = 4, shared: bool = False
) -> dict:
    """One side in this (fresh) process: per-tensor trace samples, time and peak memory."""
    torch.set_num_threads(threads)
    lm = load_model()
    model = lm.model
    model.set_attn_implementation("eager")  # both sides: SDPA's CPU kernel has no double backward
    names = [m.name for d in SearchSpace.from_file("llama").build(model) for m in d.members]
    toks = token_chunks(lm.tokenizer, load_text("austen:prideprejudice"), 256, sequences)
    stages = Stages()
    if side == "ours":
        with stages(side):  # dataloader mode: one graph per sequence, `probes` independent probes each
            est = hutchinson(
                model,
                names,
                toks,
                probes=probes,
                batch=batch,
                chunk=1 if mode == "dataloader" else None,
                share_probes=shared,
                progress=False,
            )
        mean, se = [est.trace[n] for n in names], [est.trace_se[n] for n in names]
    elif mode == "dataloader":
        ph = pyhessian()
        grads_on_decisions_only(model, names)
        batches = [(seq[None], seq[1:]) for seq in toks]
        with stages(side):
            h = ph.hessian(Logits(model), nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
            samples = np.zeros((probes, len(names)))
            for k in range(probes):
                v = [torch.randint_like(p, high=2) * 2 - 1 for p in h.params]
                _, hv = h.dataloader_hv_product(v)
                samples[k] = [float((x * y).sum()) for x, y in zip(hv, v)]
        mean, se = samples.mean(0).tolist(), (samples.std(0, ddof=1) / np.sqrt(probes)).tolist()
    else:
        ph = pyhessian()
        from pyhessian.utils import hessian_vector_product

        grads_on_decisions_only(model, names)
        with stages(side):
            h = ph.hessian(Logits(model), nn.CrossEntropyLoss(), data=(toks, toks[:, 1:].reshape(-1)), cuda=False)
            samples = np.zeros((probes, len(names)))
            for k in range(probes):
                v = [torch.randint_like(p, high=2) * 2 - 1 for p in h.params]
                hv = hessian_vector_product(h.gradsH, h.params, v)
                samples[k] = [float((x * y).sum()) for x, y in zip(hv, v)]
        mean, se = samples.mean(0).tolist(), (samples.std(0, ddof=1) / np.sqrt(probes)).tolist()
    rec = stages.records[-1]
    return {
        "side": side,
        "seconds": rec["seconds"],
        "peak_rss_mb": rec["peak_rss_mb"],
        "rss_before_mb": rec["rss_before_mb"],
        "names": names,
        "mean": mean,
        "se": se,
        "tokens": int(toks.numel()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["batch", "dataloader"], default="batch")
    ap.add_argument(
        "--sequences", type=int, default=None, help="sequences of 256 tokens (default 4, or 8 in dataloader mode)"
    )
    ap.add_argument(
        "--probes-ours", type=int, default=None, help="dataloader mode: our probes per sequence (default 2)"
    )
    ap.add_argument(
        "--shared",
        action="store_true",
        help="dataloader mode: ours shares each probe across sequences (PyHessian's estimator)",
    )
    ap.add_argument("--side", choices=["ours", "pyhessian"], help=argparse.SUPPRESS)  # internal: one side per process
    a = ap.parse_args()
    sequences = a.sequences or (8 if a.mode == "dataloader" else 4)
    if a.side:
        print("RESULT " + json.dumps(run_side(a.side, a.probes, a.batch, a.threads, a.mode, sequences, a.shared)))
        return
    pyhessian()  # install before timing anything
    sides = {}
    for side in ("pyhessian", "ours"):  # each in a fresh process: no allocator warm-up carried over
        probes = (a.probes_ours or 2) if side == "ours" and a.mode == "dataloader" else a.probes
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--side",
                side,
                "--probes",
                str(probes),
                "--batch",
                str(a.batch),
                "--threads",
                str(a.threads),
                "--mode",
                a.mode,
                "--sequences",
                str(sequences),
            ]
            + ["--shared"] * a.shared,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sides[side] = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
        print(side, sides[side]["seconds"], "s")
    o, p = sides["ours"], sides["pyhessian"]
    o_mean, o_se, p_mean, p_se = (np.array(x) for x in (o["mean"], o["se"], p["mean"], p["se"]))
    z = np.abs(o_mean - p_mean) / np.sqrt(o_se**2 + p_se**2)
    work = (p["seconds"] * p_se**2) / (o["seconds"] * o_se**2)  # time to equal SE, theirs over ours, per tensor
    result = {
        "mode": a.mode,
        "shared_probes": a.shared,
        "sequences": sequences,
        "probes": a.probes,
        "probes_ours": (a.probes_ours or 2) if a.mode == "dataloader" else a.probes,
        "batch": a.batch,
        "tensors": len(o["names"]),
        "tokens": o["tokens"],
        "seconds_ours": o["seconds"],
        "seconds_pyhessian": p["seconds"],
        "pyhessian_over_ours": p["seconds"] / o["seconds"],
        "peak_rss_mb_ours": o["peak_rss_mb"],
        "peak_rss_mb_pyhessian": p["peak_rss_mb"],
        "total_trace_ours": float(o_mean.sum()),
        "total_trace_pyhessian": float(p_mean.sum()),
        "median_abs_z": float(np.median(z)),
        "share_within_2se": float((z < 2).mean()),
        "median_rel_se_ours": float(np.median(o_se / np.abs(o_mean))),
        "median_rel_se_pyhessian": float(np.median(p_se / np.abs(p_mean))),
        "equal_variance_speedup_median": float(np.median(work)),
        "equal_variance_speedup_quartiles": [float(np.quantile(work, 0.25)), float(np.quantile(work, 0.75))],
        "machine": machine(a.threads),
    }
    write_json_atomic(
        RESULTS / ("hessian.json" if a.mode == "batch" else f"hessian_dataloader{'_shared' * a.shared}.json"), result
    )
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
