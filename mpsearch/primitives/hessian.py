"""Hessian trace and diagonal per tensor by Hutchinson's method (HAWQ-V2's sensitivity).

For a Rademacher probe ``z``, ``z . Hz`` is an unbiased estimate of ``tr(H)`` and
``z * Hz`` of ``diag(H)``; ``Hz`` is a Hessian-vector product through double
backward. What makes it fast here:

- only decision weights require grad, so the double backward is no wider than needed;
- the gradient graph is built once per chunk of calibration tokens and every probe
  reuses it (``retain_graph``);
- probes can go through autograd in batches (``is_grads_batched``: one vmapped call
  for ``batch`` probes), falling back to one at a time where vmap cannot. On CPU this
  mostly costs memory (every probe's activations at once), so the default is 1;
- traces are per tensor in the same pass (a dot product per tensor, not one per pass).

The estimate reports each tensor's standard error; with ``tol`` it stops once every
tensor's relative standard error is below ``tol`` (after ``min_probes``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.layers import matrix, weight_modules
from ..core.registry import register
from ..models.batches import as_batches
from .base import Checkpoint, Family, PrimitiveSettings, Values

log = logging.getLogger(__name__)


@dataclass
class HessianEstimate:
    """Per-tensor trace mean and standard error, the diagonal estimate, and the probes used."""

    trace: dict[str, float]
    trace_se: dict[str, float]
    diag: dict[str, torch.Tensor] = field(default_factory=dict)
    probes: int = 0

    def rel_se(self) -> dict[str, float]:
        return {t: self.trace_se[t] / abs(v) if v else math.inf for t, v in self.trace.items()}


def hutchinson(
    model: nn.Module,
    tensors: list[str],
    tokens: torch.Tensor,
    probes: int = 64,
    batch: int = 1,
    tol: float | None = None,
    min_probes: int = 8,
    diag: bool = True,
    chunk: int | None = None,
    seed: int = 0,
    progress: bool = True,
    share_probes: bool = False,
    checkpoint: Checkpoint | None = None,
) -> HessianEstimate:
    """Hutchinson estimates of the Hessian of the mean loss over ``tokens`` (token windows or
    :class:`~mpsearch.models.batches.Batches`).

    ``tokens`` is ``[n_seq, seq_len]``; ``chunk`` sequences share one gradient graph
    (default: all of them; lower it if memory runs out). Each chunk gets the same number
    of probes; the result averages the chunks. With ``share_probes`` every chunk gets
    the *same* probes and their ``Hz`` add up to the whole data's (PyHessian's
    estimator, whose variance is that of the averaged Hessian, often much lower than
    independent probes per chunk), while each chunk's graph is still built only once;
    it keeps one ``Hz`` per probe in memory and goes one probe at a time (``batch`` and
    ``tol`` do not apply: every probe needs every chunk before it counts).

    ``checkpoint`` (independent probes only) saves the sums and the probe generator
    after each chunk, so a killed run resumes at the next chunk with the same result.
    """
    if checkpoint is not None and share_probes:
        raise ValueError("a checkpoint needs independent probes per chunk (share_probes=False)")
    modules = weight_modules(model, tensors)
    data = as_batches(tokens)
    if probes < 1 or batch < 1:
        raise ValueError(f"probes and batch must be >= 1, got {probes}, {batch}")
    params = [modules[t].weight for t in tensors]
    chunk = chunk or len(data)
    chunks = [range(s, min(s + chunk, len(data))) for s in range(0, len(data), chunk)]
    gen = torch.Generator().manual_seed(seed)
    # per chunk: sums of per-probe traces and their squares, per tensor
    sums = torch.zeros(len(chunks), len(tensors), dtype=torch.float64)
    sq = torch.zeros_like(sums)
    diag_acc = [torch.zeros_like(p, dtype=torch.float32) for p in params] if diag else []
    flags = [p.requires_grad for p in model.parameters()]
    attn = double_backward_attention(model)
    done = 0
    shared = [[torch.zeros_like(p) for p in params] for _ in range(probes)] if share_probes else []
    start, saved, extra = checkpoint.resume() if checkpoint else (0, {}, {})
    if start:
        sums, sq, done = saved["sums"], saved["sq"], int(extra["done"])
        diag_acc = [saved[f"diag::{t}"].to(p.device) for t, p in zip(tensors, params)] if diag else []
        gen.set_state(saved["generator"])
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        bar = tqdm(
            total=len(chunks) * probes,
            initial=start * probes,
            desc="hutchinson (Hz probes)",
            disable=not progress,
            unit="probe",
        )
        for c, ids in enumerate(chunks):
            if c < start:
                continue
            loss = data.loss(model, ids) * (len(ids) / len(data))
            grads = torch.autograd.grad(loss, params, create_graph=True)
            done = 0
            for k, acc in enumerate(shared):  # the same probe k in every chunk: Hz adds up over chunks
                zs = _probe(params, seed, k)
                for a, hz in zip(acc, _hvp(grads, params, zs)):
                    a += hz[0]
                bar.update(1)
                done = probes
            while done < probes:
                b = min(batch, probes - done)
                # drawn on the CPU (the same probes on every device), then moved beside their weights
                zs = [
                    torch.empty((b, *p.shape), dtype=p.dtype)
                    .bernoulli_(0.5, generator=gen)
                    .mul_(2)
                    .sub_(1)
                    .to(p.device)
                    for p in params
                ]
                hzs = _hvp(grads, params, zs)
                for i, (z, hz) in enumerate(zip(zs, hzs)):
                    vals = (z * hz).reshape(b, -1).sum(1).double().cpu() * len(
                        chunks
                    )  # chunk c's share, scaled to the whole
                    sums[c, i] += vals.sum()
                    sq[c, i] += (vals * vals).sum()
                    if diag:
                        diag_acc[i] += (z * hz).sum(0).float()
                done += b
                bar.update(b)
                if tol is not None and len(chunks) == 1 and done >= min_probes:
                    mean, se = _stats(sums[:1], sq[:1], done)
                    if bool((se / mean.abs().clamp_min(1e-300) < tol).all()):
                        bar.update(probes - done)
                        break
            del grads, loss
            if checkpoint and c + 1 < len(chunks):
                checkpoint.save(
                    c + 1,
                    lambda: {
                        "sums": sums,
                        "sq": sq,
                        "generator": gen.get_state(),
                        **{f"diag::{t}": d for t, d in zip(tensors, diag_acc)},
                    },
                    {"done": done},
                )
        bar.close()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        if attn is not None:
            model.set_attn_implementation(attn)
    for k, acc in enumerate(shared):
        for i, (z, hz) in enumerate(zip(_probe(params, seed, k), acc)):
            val = float((z[0] * hz).sum())
            sums[0, i] += val
            sq[0, i] += val * val
            if diag:
                diag_acc[i] += (z[0] * hz).float()
    if shared:
        sums, sq = sums[:1], sq[:1]
    mean, se = _stats(sums, sq, done)
    out = HessianEstimate(
        trace={t: float(mean[i]) for i, t in enumerate(tensors)},
        trace_se={t: float(se[i]) for i, t in enumerate(tensors)},
        probes=done,
    )
    if diag:
        out.diag = {
            t: matrix(modules[t], d / done).contiguous() for t, d in zip(tensors, diag_acc)
        }  # each chunk adds its share of H
    return out


def _probe(params: list[torch.Tensor], seed: int, k: int) -> list[torch.Tensor]:
    """Rademacher probe number ``k``, reproducible from ``(seed, k)`` so it need not be stored
    (drawn on the CPU, so every device gets the same probe, and moved beside its weight)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
    return [
        torch.empty((1, *p.shape), dtype=p.dtype).bernoulli_(0.5, generator=gen).mul_(2).sub_(1).to(p.device)
        for p in params
    ]


def double_backward_attention(model: nn.Module) -> str | None:
    """Switch a transformers model to eager attention (SDPA's CPU kernel has no double
    backward, nor have the fused CUDA ones); returns the implementation to restore, or None if nothing changed."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        return None
    model.set_attn_implementation("eager")
    return current


def _stats(sums: torch.Tensor, sq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over chunks of each chunk's mean, and its standard error (chunks independent)."""
    mean_c = sums / n
    var_c = (sq / n - mean_c**2).clamp_min(0) * n / max(n - 1, 1)
    k = sums.shape[0]
    return mean_c.mean(0), (var_c / n).sum(0).sqrt() / k


def _hvp(grads, params, zs):
    """``H z`` for a batch of probes; vmapped when autograd can, else one probe at a time."""
    if zs[0].shape[0] == 1:  # a plain double backward; vmap would only add overhead
        return [
            h.unsqueeze(0)
            for h in torch.autograd.grad(grads, params, grad_outputs=[z[0] for z in zs], retain_graph=True)
        ]
    try:
        return torch.autograd.grad(grads, params, grad_outputs=zs, retain_graph=True, is_grads_batched=True)
    except RuntimeError as e:  # some ops have no batching rule
        log.debug("batched HVP unavailable (%s); probing one at a time", e)
        outs = [
            torch.autograd.grad(grads, params, grad_outputs=[z[k] for z in zs], retain_graph=True)
            for k in range(zs[0].shape[0])
        ]
        return [torch.stack([o[i] for o in outs]) for i in range(len(params))]


def _hessian_family(
    model: nn.Module,
    tensors: list[str],
    tokens: torch.Tensor,
    settings: PrimitiveSettings,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
) -> Values:
    """The primitive family: each calibration sequence is one graph with ``hessian_probes`` probes."""
    data = as_batches(tokens)
    seqs = data.head(settings.hessian_sequences) if settings.hessian_sequences else data
    est = hutchinson(
        model,
        tensors,
        seqs,
        probes=settings.hessian_probes,
        chunk=1,
        seed=settings.seed,
        progress=progress,
        checkpoint=checkpoint,
    )
    return {
        "htrace": {t: torch.tensor(v, dtype=torch.float64) for t, v in est.trace.items()},
        "htrace_se": {t: torch.tensor(v, dtype=torch.float64) for t, v in est.trace_se.items()},
        "hdiag": est.diag,
    }


FAMILY = register("primitive family", "hessian")(
    Family(
        "hessian",
        ("htrace", "htrace_se", "hdiag"),
        _hessian_family,
        settings=("hessian_probes", "hessian_sequences", "seed"),
        resumable=True,
        about="Hutchinson Hessian trace per tensor (with its standard error) and diagonal estimate z*Hz",
    )
)
