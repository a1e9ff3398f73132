"""Gradient primitives: one forward + backward per calibration sequence.

- ``fisher``: the empirical Fisher diagonal, the mean over sequences of the squared
  per-sequence gradient (not the square of the batch gradient, which cancels signs);
- ``grad``: the mean gradient (the batch gradient), for gradient norm and SNIP.

Only decision weights get gradients, so the backward pass is no wider than needed.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.layers import matrix, weight_modules
from ..core.registry import register
from ..models.batches import as_batches
from .base import Checkpoint, Family, PrimitiveSettings, Values


def gradients(
    model: nn.Module,
    tensors: list[str],
    tokens: torch.Tensor,
    settings: PrimitiveSettings | None = None,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
) -> Values:
    """One backward per sequence; each weight's gradient is folded into the sums the moment
    it is ready and then freed (a post-accumulate hook), so the pass never holds a full set
    of gradients next to the two sums."""
    modules = weight_modules(model, tensors)
    data = as_batches(tokens)
    params = [modules[t].weight for t in tensors]
    start, saved, _ = checkpoint.resume() if checkpoint else (0, {}, {})
    # the sums live beside their weights (a resumed checkpoint is read on the CPU)
    f_acc = [
        saved[f"f::{t}"].to(p.device) if f"f::{t}" in saved else torch.zeros_like(p, dtype=torch.float32)
        for t, p in zip(tensors, params)
    ]
    g_acc = [
        saved[f"g::{t}"].to(p.device) if f"g::{t}" in saved else torch.zeros_like(p, dtype=torch.float32)
        for t, p in zip(tensors, params)
    ]
    flags = [p.requires_grad for p in params]

    def fold(f: torch.Tensor, g: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            grad = p.grad.float()
            f.addcmul_(grad, grad)
            g.add_(grad)
            p.grad = None

        return hook

    handles = []
    try:
        for p, f, g in zip(params, f_acc, g_acc):
            p.requires_grad_(True)
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(fold(f, g)))
        bar = tqdm(total=len(data), initial=start, desc="gradients (fisher, grad)", disable=not progress, unit="batch")
        for i in range(start, len(data)):
            data.loss_backward(model, i)
            bar.update()
            if checkpoint and i + 1 < len(data):
                checkpoint.save(
                    i + 1,
                    lambda: {
                        **{f"f::{t}": f for t, f in zip(tensors, f_acc)},
                        **{f"g::{t}": g for t, g in zip(tensors, g_acc)},
                    },
                )
        bar.close()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags):
            p.grad = None
            p.requires_grad_(flag)
    n = len(data)
    return {
        "fisher": {t: matrix(modules[t], f.div_(n)).contiguous() for t, f in zip(tensors, f_acc)},
        "grad": {t: matrix(modules[t], g.div_(n)).contiguous() for t, g in zip(tensors, g_acc)},
    }


FAMILY = register("primitive family", "gradients")(
    Family(
        "gradients",
        ("fisher", "grad"),
        gradients,
        version="v4",
        resumable=True,
        about="empirical Fisher diagonal (mean squared per-sequence gradient) and the mean gradient",
    )
)
