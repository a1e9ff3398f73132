"""Dense-and-sparse: keep the most salient fraction of weights exactly (fp16), quantize the rest.

SqueezeLLM and PB-LLM keep a small share of weights out of the low-bit grid. Here the
salience of a weight is ``|w| * sqrt(importance of its column)`` (``|w|`` without an
importance vector), the top ``outliers`` fraction of the tensor (a global threshold) is
stored in CSR form and the rest, with the outliers zeroed so they do not stretch any
group's range, goes to the base quantizer. Cost added per weight: ``fraction * (16 + 32)``
(an fp16 value and an int32 column index per outlier) plus ``32 / row`` (one int32 row
pointer per row). Any quantizer that lists ``outliers`` in its params takes it; the
format key gets ``+o<percent>``: ``u3g64a+o0.5``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from ..core.format import Format, FormatError

VALUE_BITS = 16
INDEX_BITS = 32


def fraction(fmt: Format) -> float:
    return float(dict(fmt.params).get("outliers", 0.0) or 0.0)


def without(fmt: Format) -> Format:
    """``fmt`` with no outliers: its grid alone."""
    return replace(fmt, params=tuple((k, v) for k, v in fmt.params if k != "outliers"))


def check(fmt: Format) -> None:
    f = dict(fmt.params).get("outliers")
    if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 0.1):
        raise FormatError(f"outliers must be a fraction in (0, 0.1], got {f!r}")


def cost(fmt: Format, in_features: int) -> float:
    f = fraction(fmt)
    return f * (VALUE_BITS + INDEX_BITS) + INDEX_BITS / in_features if f else 0.0


def suffix(fmt: Format) -> str:
    f = fraction(fmt)
    return f"+o{f * 100:g}" if f else ""


def dense_and_sparse(fn: Callable, w: torch.Tensor, fmt: Format, importance: torch.Tensor | None) -> torch.Tensor:
    """``fn`` on the dense part; the outliers back at their fp16 values."""
    x = w.detach().to(torch.float32)
    sal = (
        x.abs()
        if importance is None
        else x.abs() * importance.detach().to(x.device).float().clamp_min(0).sqrt().reshape(1, -1)
    )
    k = min(x.numel(), math.ceil(fraction(fmt) * x.numel()))
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[sal.reshape(-1).topk(k).indices] = True
    mask = mask.reshape(x.shape)
    dense = fn(torch.where(mask, torch.zeros_like(x), x), fmt, importance)
    kept = x.to(torch.float16).to(torch.float32)
    return torch.where(mask, kept, dense.to(torch.float32)).to(w.dtype)
