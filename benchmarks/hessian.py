"""Benchmark: per-tensor Hutchinson Hessian traces, ours against PyHessian, same probes and data.

Model SmolLM2-135M, its 210 decision linears; 4 sequences x 256 tokens of Pride and
Prejudice; Rademacher probes (same count both sides, hence the same variance).

- ours: ``mpsearch.primitives.hessian.hutchinson`` (one graph, probes batched through
  autograd, per-tensor traces and the diagonal in the same pass);
- PyHessian 0.1 (installed here only, ``pip install --no-deps pyhessian==0.1``): its
  ``hessian`` object on the same weights (requires_grad on the decision weights only),
  its ``hessian_vector_product`` per probe, per-tensor ``v . Hv`` taken from its Hv (its
  ``trace()`` returns only the total, so per-tensor traces need this), and also its
  ``trace()`` for the total.

Reports time and peak memory of each, the ratio, and agreement of the estimates.

    .venv/bin/python benchmarks/hessian.py [--probes 8] [--threads 2]
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from mpsearch.models import load_model, load_text, token_chunks
from mpsearch.plan import write_json_atomic
from mpsearch.primitives.hessian import hutchinson
from mpsearch.profiling import Stages
from mpsearch.space import SearchSpace

from foundation import RESULTS, machine  # noqa: E402  (same folder)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ph = pyhessian()
    from pyhessian.utils import hessian_vector_product

    lm = load_model()
    model = lm.model
    model.set_attn_implementation("eager")  # both sides: SDPA's CPU kernel has no double backward
    names = [m.name for d in SearchSpace.from_file("llama").build(model) for m in d.members]
    toks = token_chunks(lm.tokenizer, load_text("austen:prideprejudice"), 256, 4)
    stages = Stages()

    with stages("ours"):
        t0 = time.perf_counter()
        ours = hutchinson(model, names, toks, probes=a.probes, batch=a.batch, progress=True)
        t_ours = time.perf_counter() - t0

    modules = dict(model.named_modules())
    params = [modules[n].weight for n in names]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    with stages("pyhessian per-tensor"):
        t0 = time.perf_counter()
        h = ph.hessian(Logits(model), nn.CrossEntropyLoss(), data=(toks, toks[:, 1:].reshape(-1)), cuda=False)
        samples = np.zeros((a.probes, len(names)))
        for k in range(a.probes):
            v = [torch.randint_like(p, high=2) * 2 - 1 for p in h.params]
            hv = hessian_vector_product(h.gradsH, h.params, v)
            samples[k] = [float((x * y).sum()) for x, y in zip(hv, v)]
        t_ph = time.perf_counter() - t0
    with stages("pyhessian trace() total"):
        t0 = time.perf_counter()
        totals = h.trace(maxIter=a.probes, tol=0.0)
        t_ph_total = time.perf_counter() - t0  # reuses the graph built above
    del h

    ph_mean = samples.mean(0)
    ph_se = samples.std(0, ddof=1) / np.sqrt(a.probes)
    o_mean = np.array([ours.trace[n] for n in names])
    o_se = np.array([ours.trace_se[n] for n in names])
    z = np.abs(o_mean - ph_mean) / np.sqrt(o_se**2 + ph_se**2)
    result = {
        "probes": a.probes, "batch": a.batch, "tensors": len(names), "tokens": int(toks.numel()),
        "seconds_ours": t_ours, "seconds_pyhessian_per_tensor": t_ph, "seconds_pyhessian_trace_total_only": t_ph_total,
        "speedup_vs_pyhessian_per_tensor": t_ph / t_ours,
        "total_trace_ours": float(o_mean.sum()), "total_trace_pyhessian": float(ph_mean.sum()),
        "total_trace_pyhessian_trace()": float(np.mean(totals)), "pyhessian_trace_probes": len(totals),
        "median_abs_z": float(np.median(z)), "share_within_2se": float((z < 2).mean()),
        "log_trace_correlation": float(np.corrcoef(np.log(np.abs(o_mean)), np.log(np.abs(ph_mean)))[0, 1]),
        "median_rel_se_ours": float(np.median(o_se / np.abs(o_mean))), "median_rel_se_pyhessian": float(np.median(ph_se / np.abs(ph_mean))),
        "stages": stages.records, "machine": machine(a.threads),
    }
    write_json_atomic(RESULTS / "hessian.json", result)
    print({k: v for k, v in result.items() if k not in ("stages", "machine")})
    for r in stages.records:
        print(r)


if __name__ == "__main__":
    main()
