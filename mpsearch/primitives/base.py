"""What a primitive family is: one pass over the calibration data that yields named arrays.

A family (gradients, activations, hessian, synflow) computes several primitives at
once because they share the pass; each family is cached on its own, so asking for a
new primitive never recomputes the others. A new family is one file that registers a
:class:`Family` under ``("primitive family", name)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

#: primitive name -> {tensor name -> array}; scalars per tensor are 0-d tensors
Values = dict[str, dict[str, torch.Tensor]]


class PrimitiveError(RuntimeError):
    """Primitives that are missing, corrupt, or contain NaN/inf."""


@dataclass(frozen=True)
class PrimitiveSettings:
    """Knobs of the expensive primitives; part of the cache key of the families that read them."""

    #: Hutchinson probes per calibration sequence (each sequence is one gradient graph)
    hessian_probes: int = 2
    #: calibration sequences the Hessian is estimated on (0 = all)
    hessian_sequences: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hessian_probes < 1:
            raise ValueError(f"hessian_probes must be >= 1, got {self.hessian_probes}")
        if self.hessian_sequences < 0:
            raise ValueError(f"hessian_sequences must be >= 0, got {self.hessian_sequences}")


Compute = Callable[[nn.Module, list[str], torch.Tensor, PrimitiveSettings, bool], Values]


@dataclass(frozen=True)
class Family:
    """``compute(model, tensors, tokens, settings, progress)`` returns every name in ``provides``."""

    name: str
    provides: tuple[str, ...]
    compute: Compute
    #: bump when the computation changes, so old cache entries are not reused
    version: str = "v1"
    #: the :class:`PrimitiveSettings` fields that change the result
    settings: tuple[str, ...] = ()
    #: one line for ``mpsearch list`` and the docs
    about: str = ""


def linear_modules(model: nn.Module, tensors: list[str]) -> dict[str, nn.Linear]:
    """The named linear layers, or a KeyError naming the ones that are not."""
    modules = dict(model.named_modules())
    missing = [t for t in tensors if not isinstance(modules.get(t), nn.Linear)]
    if missing:
        raise KeyError(f"not linear layers of this model: {missing[:5]}")
    return {t: modules[t] for t in tensors}
