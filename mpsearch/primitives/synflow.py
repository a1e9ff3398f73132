"""Synflow saliency (Tanaka et al. 2020), the data-free zero-cost score EMQ's baselines use.

Every parameter is replaced by its absolute value, the model runs in float64 (so the
product of many layers neither overflows nor underflows) on an all-ones input
embedding, and ``R`` = the sum of the logits is differentiated: the saliency of a
weight is ``|w * dR/dw|``. The model itself is left untouched (a float64 copy is used).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..core.layers import matrix, weight_modules
from ..core.registry import register
from ..models.batches import as_batches
from .base import Family, PrimitiveSettings, Values


def synflow(
    model: nn.Module,
    tensors: list[str],
    tokens: torch.Tensor,
    settings: PrimitiveSettings | None = None,
    progress: bool = True,
) -> Values:
    weight_modules(model, tensors)  # fail early on a wrong name
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in twin.parameters():
            p.abs_().requires_grad_(False)
    modules = dict(twin.named_modules())
    params = [modules[t].weight.requires_grad_(True) for t in tensors]
    r = as_batches(tokens).synflow_output(twin)
    grads = torch.autograd.grad(r, params)
    return {
        "synflow": {
            t: matrix(modules[t], (p.detach() * g).abs().float()).contiguous()
            for t, p, g in zip(tensors, params, grads)
        }
    }


FAMILY = register("primitive family", "synflow")(
    Family(
        "synflow",
        ("synflow",),
        synflow,
        about="synflow saliency |w * dR/dw| of the all-positive float64 model on an all-ones input",
    )
)
