"""Quantizers (looked up by name) and the one verb that applies a plan to a model."""
from __future__ import annotations

import torch

from ..core.format import FULL_BITS, PER_CHANNEL, Format, FormatError
from . import activation, affine, ggml, gptq, kvcache, nonuniform, uniform  # noqa: F401  (registers quantizers)
from .quantizer import Quantizer, format_identity, get_quantizer, quantizer_version


def quantize(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize ``w`` with ``fmt``; 16 bits returns the tensor unchanged.

    ``importance`` (``[in_features]``, e.g. the layer input's second moments, which is
    what llama.cpp's imatrix holds) weights each column's error in quantizers that
    search their scales; the others ignore it.
    """
    if fmt.is_full:
        return w.detach().clone()
    return get_quantizer(fmt.quantizer)(w, fmt, importance)


__all__ = ["Format", "FormatError", "FULL_BITS", "PER_CHANNEL", "Quantizer", "format_identity", "get_quantizer", "quantize", "quantizer_version"]

from .apply import applied, apply, apply_, quantizable_names  # noqa: E402

__all__ += ["apply", "apply_", "applied", "quantizable_names"]
