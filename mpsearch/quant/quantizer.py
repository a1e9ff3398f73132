"""What a registered quantizer is: the rounding function, what it accepts, and its version.

A format names its quantizer; the quantizer decides whether the format is valid
(bits, parameters) when the format is built, so a plan with ``"quantizer": "gptq"``
or junk ``params`` fails on load, not at apply. ``version`` is part of every cache key
that depends on quantized values: bump it when the rounding changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import registry
from ..format import Format, FormatError


@dataclass(frozen=True)
class Quantizer:
    """``fn(w, fmt)`` fake-quantizes a 2-D weight; ``check(fmt)`` raises :class:`FormatError` for what it cannot do."""

    name: str
    fn: Callable[[torch.Tensor, Format], torch.Tensor]
    version: str = "v1"
    #: the ``params`` keys it reads (any other key is an error)
    params: tuple[str, ...] = ()
    #: fewest bits for asymmetric / symmetric formats
    min_bits: int = 1
    min_bits_symmetric: int = 2
    about: str = ""

    def check(self, fmt: Format) -> None:
        extra = sorted(set(dict(fmt.params)) - set(self.params))
        if extra:
            allowed = ", ".join(self.params) or "none"
            raise FormatError(f"quantizer {self.name!r} takes no params {extra} (allowed: {allowed})")
        if fmt.is_full:
            return
        least = self.min_bits_symmetric if fmt.symmetric else self.min_bits
        if fmt.bits < least:
            kind = "symmetric" if fmt.symmetric else "asymmetric"
            raise FormatError(f"{kind} {self.name} quantization needs at least {least} bits, got {fmt.bits}")

    def __call__(self, w: torch.Tensor, fmt: Format) -> torch.Tensor:
        return self.fn(w, fmt)


def get_quantizer(name: str) -> Quantizer:
    """The registered quantizer ``name``; the error lists the known ones."""
    return registry.get("quantizer", name)


def quantizer_version(fmt: Format) -> str:
    """``name@version`` of the quantizer behind ``fmt``: goes into cache keys."""
    q = get_quantizer(fmt.quantizer)
    return f"{q.name}@{q.version}"


def format_identity(fmt: Format) -> str:
    """Everything that decides a format's quantized values: key, params and quantizer version."""
    params = ",".join(f"{k}={v!r}" for k, v in fmt.params)
    return f"{fmt.key}[{params}]@{quantizer_version(fmt)}"
