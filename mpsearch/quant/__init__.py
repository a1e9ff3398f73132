"""Quantizers (looked up by name: each module of this package registers its own) and the one
verb that applies a plan to a model."""

from __future__ import annotations

from ..core.format import FULL_BITS, PER_CHANNEL, Format, FormatError
from .apply import applied, apply, apply_, quantizable_names
from .quantizer import Quantizer, format_identity, get_quantizer, quantize, quantizer_version

__all__ = [
    "FULL_BITS",
    "PER_CHANNEL",
    "Format",
    "FormatError",
    "Quantizer",
    "applied",
    "apply",
    "apply_",
    "format_identity",
    "get_quantizer",
    "quantizable_names",
    "quantize",
    "quantizer_version",
]
