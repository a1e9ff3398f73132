"""Layer kinds: which modules hold decision weights, and how each weight reads as a matrix.

Every quantizer, primitive and proxy works on a weight as a matrix ``[out, fan_in]``
whose rows are quantized in groups along ``fan_in``. A layer kind says how its module's
weight is that matrix and how the module's input becomes the rows that multiply it:

- ``Linear``: the weight as it is; the input's last dimension;
- ``Conv1d`` / ``Conv2d``: the weight flattened over ``in_channels x kernel`` per output
  channel (groups run over the flattened fan-in), the input unfolded into patches (im2col);
- ``Conv1D``: transformers' GPT-2-style linear whose weight is stored ``[in, out]``: its transpose.

A search space selects modules by these names (``types = ["Linear", "Conv2d"]``). A new
kind is one :class:`LayerKind` registered under ``("layer kind", name)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import registry


@dataclass(frozen=True)
class LayerKind:
    """How one module type's weight is a matrix and its input the rows that multiply it."""

    name: str
    #: does this module belong to the kind
    test: Callable[[nn.Module], bool]
    #: weight-shaped tensor (the weight, a gradient, a Fisher diagonal) -> ``[out, fan_in]``
    to_matrix: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    #: ``[out, fan_in]`` -> weight-shaped
    from_matrix: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    #: the module's input (first positional argument) -> ``[rows, fan_in]``
    rows: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _conv_rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if mod.groups != 1:
        raise ValueError(f"input statistics of a grouped convolution (groups={mod.groups}) are not supported")
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        raise ValueError(
            f"input statistics need numeric zero padding, got padding={mod.padding!r}, mode={mod.padding_mode!r}"
        )
    if isinstance(mod, nn.Conv1d):
        x = x.unsqueeze(-2)  # [B, C, 1, L]: unfold as 2-D with a kernel of height 1
        k, s, p, d = (1, *mod.kernel_size), (1, *mod.stride), (0, *mod.padding), (1, *mod.dilation)
    else:
        k, s, p, d = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [B, C*k, L], fan-in ordered as the weight flattens
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _register(kind: LayerKind) -> LayerKind:
    return registry.register("layer kind", kind.name)(kind)


LINEAR = _register(
    LayerKind(
        "Linear",
        lambda m: isinstance(m, nn.Linear),
        lambda m, t: t,
        lambda m, t: t,
        lambda m, x: x.reshape(-1, x.shape[-1]),
    )
)
for _cls in (nn.Conv1d, nn.Conv2d):
    _register(
        LayerKind(
            _cls.__name__,
            lambda m, c=_cls: isinstance(m, c),
            lambda m, t: t.reshape(t.shape[0], -1),
            lambda m, t: t.reshape(m.weight.shape),
            _conv_rows,
        )
    )
_register(
    LayerKind(
        "Conv1D",
        lambda m: type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2,
        lambda m, t: t.T,
        lambda m, t: t.T,
        lambda m, x: x.reshape(-1, x.shape[-1]),
    )
)


def kinds() -> dict[str, LayerKind]:
    return {n: registry.get("layer kind", n) for n in registry.names("layer kind")}


def kind_of(module: nn.Module) -> LayerKind | None:
    """The registered kind of ``module``, or None (norms, embeddings, containers)."""
    return next((k for k in kinds().values() if k.test(module)), None)


def check_types(types) -> None:
    known = sorted(kinds())
    for t in types:
        if t not in known:
            raise ValueError(f"unknown layer type {t!r}; known: {known}")


def weight_modules(model: nn.Module, tensors: list[str]) -> dict[str, nn.Module]:
    """The named decision modules, or a KeyError naming the ones that are not of a known kind."""
    modules = dict(model.named_modules())
    missing = [t for t in tensors if t not in modules or kind_of(modules[t]) is None]
    if missing:
        raise KeyError(f"not decision layers of this model (Linear, Conv, Conv1D): {missing[:5]}")
    return {t: modules[t] for t in tensors}


def matrix(module: nn.Module, t: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` (default: the module's weight) as the ``[out, fan_in]`` matrix quantizers see."""
    return kind_of(module).to_matrix(module, module.weight if t is None else t)


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    return tuple(matrix(module).shape)


def set_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write an ``[out, fan_in]`` matrix back into the module's weight (no grad)."""
    with torch.no_grad():
        module.weight.copy_(kind_of(module).from_matrix(module, w))


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's input as the ``[rows, fan_in]`` matrix its weight matrix multiplies."""
    return kind_of(module).rows(module, x)
