"""Hutch++ per tensor: Hutchinson with the top of each tensor's Hessian deflated out.

Hutchinson's variance for a Rademacher probe is ``2 (||H||_F^2 - sum_i H_ii^2)``: it is
dominated by the few large eigenvalues of a layer's Hessian block. Hutch++ (Meyer,
Musco, Musco and Woodruff, SOSA 2021) spends ``sketch`` Hessian-vector products to
find the range ``Q`` of those directions (``Q = orth(H S)``), takes their trace
``tr(Q^T H Q)`` with ``sketch`` more, and runs Hutchinson only on what is left,
``(I - QQ^T) H (I - QQ^T)``, whose variance is much smaller when the spectrum decays.

Per tensor here: one HVP serves every tensor at once (the probes are joint), so
``Q_t`` comes from block ``t`` of ``H S``, and the exact part multiplies each tensor's
``Q_t`` column by a random sign before the joint HVP, which makes the cross-tensor
terms ``Q_t^T H_ts Q_s`` average to zero (unbiased; they add some variance). A
diagonal control variate (the Fisher diagonal) would not help: for Rademacher probes
``z^T D z = tr(D)`` exactly, so it has no variance to cancel.

The returned standard error covers the residual probes only; ``benchmarks/hutchpp.py``
measures the whole estimator's variance over seeds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.layers import weight_modules
from ..models.batches import as_batches
from .hessian import HessianEstimate, double_backward_attention


def hutchpp(
    model: nn.Module, tensors: list[str], tokens, sketch: int = 4, probes: int = 8, seed: int = 0
) -> HessianEstimate:
    """Per-tensor Hessian traces of the mean loss over ``tokens`` (one graph) with ``2 sketch + probes`` HVPs."""
    if sketch < 1 or probes < 2:
        raise ValueError(f"need sketch >= 1 and probes >= 2, got {sketch}, {probes}")
    modules = weight_modules(model, tensors)
    data = as_batches(tokens)
    params = [modules[t].weight for t in tensors]
    gen = torch.Generator().manual_seed(seed)

    dtype = params[0].dtype

    def rademacher(shape) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype).bernoulli_(0.5, generator=gen).mul_(2).sub_(1)

    flags = [p.requires_grad for p in model.parameters()]
    attn = double_backward_attention(model)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        loss = data.loss(model, range(len(data)))
        grads = torch.autograd.grad(loss, params, create_graph=True)

        def hvp(vs: list[torch.Tensor]) -> list[torch.Tensor]:
            return [h.reshape(-1) for h in torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)]

        ys = [[] for _ in params]
        for _ in range(sketch):  # 1. the sketch H S
            for y, h in zip(ys, hvp([rademacher(p.shape) for p in params])):
                y.append(h)
        qs = [torch.linalg.qr(torch.stack(y, 1)).Q for y in ys]  # [n_t, sketch] per tensor
        del ys
        exact = torch.zeros(len(params), dtype=torch.float64)
        for j in range(sketch):  # 2. tr(Q^T H Q), cross-tensor terms sign-randomised away
            signs = rademacher((len(params),))
            hs = hvp([(s * q[:, j]).reshape(p.shape) for s, q, p in zip(signs, qs, params)])
            for i, (s, q, h) in enumerate(zip(signs, qs, hs)):
                exact[i] += float(s * (q[:, j] @ h))
        samples = torch.zeros(probes, len(params), dtype=torch.float64)
        for k in range(probes):  # 3. Hutchinson on (I - QQ^T) H (I - QQ^T)
            zs = []
            for q, p in zip(qs, params):
                z = rademacher((p.numel(),))
                zs.append(z - q @ (q.T @ z))
            for i, (z, h) in enumerate(zip(zs, hvp([z.reshape(p.shape) for z, p in zip(zs, params)]))):
                samples[k, i] = float(z @ h)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        if attn is not None:
            model.set_attn_implementation(attn)
    trace = exact + samples.mean(0)
    se = samples.std(0, unbiased=True) / math.sqrt(probes)
    return HessianEstimate(
        trace={t: float(trace[i]) for i, t in enumerate(tensors)},
        trace_se={t: float(se[i]) for i, t in enumerate(tensors)},
        probes=2 * sketch + probes,
    )
