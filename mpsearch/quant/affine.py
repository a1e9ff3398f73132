"""The affine integer grid of PyTorch and torchao: signed levels, an integer zero point, fp32 scales.

torchao's ``IntxWeightOnlyConfig`` (``choose_qparams_affine`` / ``quantize_affine`` in
``torchao/quantization/quant_primitives.py``) quantizes each group to the levels
``qmin..qmax = -2^(b-1)..2^(b-1)-1``:

- asymmetric: the range widened to include 0, ``scale = (max - min) / (qmax - qmin)``
  (at least fp32 eps), an integer ``zero = qmin - round(min / scale)`` clamped to the levels;
- symmetric: ``scale = absmax / ((qmax - qmin) / 2)``, zero 0 (so a group's absmax maps
  to 7.5 steps at 4 bits, and ``-8`` is reachable);
- ``q = clamp(round(x * (1 / scale)) + zero, qmin, qmax)``, back as ``(q - zero) * scale``.

mpsearch's ``uniform`` grid differs (a float offset, ranges not forced through 0,
``±(2^(b-1)-1)`` symmetric levels), so a plan meant to run under torchao is searched in
``affine`` formats, which reproduce torchao's weights. Stored: ``bits`` per weight, an fp32
scale per group and, asymmetric, an int8 zero point.
"""

from __future__ import annotations

import torch

from ..core.format import PER_CHANNEL, Format
from ..core.registry import register
from .quantizer import Quantizer, groups_of


def quantize_affine(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> torch.Tensor:
    x, _ = groups_of(w, fmt, None, "affine")
    qmin, qmax = -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    eps = torch.finfo(torch.float32).eps
    if fmt.symmetric:
        scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=eps)
        zero = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero, qmin, qmax)
    return ((q - zero) * scale).reshape(w.shape).to(w.dtype)


def _storage(fmt: Format, in_features: int) -> float:
    group = in_features if fmt.group_size == PER_CHANNEL else fmt.group_size
    return fmt.bits + (32 + (0 if fmt.symmetric else 8)) / group


AFFINE = register("quantizer", "affine")(
    Quantizer(
        "affine",
        quantize_affine,
        version="v1",
        min_bits_symmetric=1,
        storage_bits=_storage,
        about="torchao's / PyTorch's affine integer grid: signed levels, integer zero point, fp32 scale (int8 zero)",
    )
)
