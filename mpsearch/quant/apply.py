"""``apply_(model, plan)``: the one verb that puts a plan on a model (simulated quantization)."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from ..plan import Plan, PlanError
from . import quantize


def quantizable_names(model: nn.Module) -> list[str]:
    """Names a plan may address: every module with a 2-D ``weight``."""
    return [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]


@torch.no_grad()
def apply_(model: nn.Module, plan: Plan, check: bool = True) -> nn.Module:
    """Fake-quantize ``model``'s weights in place as ``plan`` says; returns ``model``.

    The model fingerprint is checked first (``check=False`` skips it, for a plan made
    for a sibling model with the same tensor names), then every entry is resolved to
    an exact module name; nothing is changed if any entry is invalid.
    """
    if check:
        plan.check_model(model)
    resolved = plan.resolve(quantizable_names(model))
    for name, entry in resolved.tensors.items():
        for target in entry:
            if target != "weight" and entry[target] is not None:
                raise PlanError(f"tensors[{name!r}].{target}: activation/KV quantization is not supported by this backend yet")
    modules = dict(model.named_modules())
    new = {n: quantize(modules[n].weight, f) for n, f in resolved.weight_formats().items()}
    for n, w in new.items():
        modules[n].weight.copy_(w)
    return model


def apply(model: nn.Module, plan: Plan, check: bool = True) -> nn.Module:
    """A quantized deep copy; ``model`` is untouched."""
    return apply_(copy.deepcopy(model), plan, check)


@contextlib.contextmanager
def applied(model: nn.Module, plan: Plan, check: bool = True) -> Iterator[nn.Module]:
    """Quantize in place for the ``with`` block, then restore the original weights."""
    modules = dict(model.named_modules())
    names = plan.resolve(quantizable_names(model)).weight_formats()
    saved = {n: modules[n].weight.detach().clone() for n in names}
    try:
        yield apply_(model, plan, check)
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                modules[n].weight.copy_(w)
