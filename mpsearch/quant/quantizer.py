"""What a registered quantizer is: the rounding function, what it accepts, its stored
layout, and its version.

A format names its quantizer; the quantizer decides whether the format is valid
(bits, parameters) when the format is built, so a plan with ``"quantizer": "gptq"``
or junk ``params`` fails on load, not at apply. The quantizer also owns the layout:
which row lengths it fits and the exact bits per weight it stores (scales, zeros,
super-block scales, codebooks), so budgets and reports read the cost from the one
place that knows it. ``version`` is part of every cache key that depends on
quantized values: bump it when the rounding changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..core import registry
from ..core.format import PER_CHANNEL, Format, FormatError
from . import outliers

#: bits of storage for one per-group scale and one zero point (fp16 each)
SCALE_BITS = 16
ZERO_BITS = 16


@dataclass(frozen=True)
class Quantizer:
    """``fn(w, fmt, importance)`` fake-quantizes a 2-D weight ``[out, in]``; ``importance``
    (``[in]``, optional) weights each input column's error in the scale search (GPTQ
    reads the whole Gram matrix ``[in, in]`` instead, see ``importance_kind``).
    ``check(fmt)`` raises :class:`FormatError` for what it cannot do.

    The default layout is per-group: ``bits`` per weight plus an fp16 scale (and an
    fp16 zero point when asymmetric) per group. A quantizer with another layout passes
    ``storage_bits`` (bits per weight of a format at a row length) and ``fixed`` (the
    format fields its layout pins, e.g. GGUF's Q4_K is 4 bits in blocks of 256).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    version: str = "v1"
    #: the ``params`` keys it reads (any other key is an error)
    params: tuple[str, ...] = ()
    #: fewest bits for asymmetric / symmetric formats
    min_bits: int = 1
    min_bits_symmetric: int = 2
    about: str = ""
    #: format fields the layout pins (``bits``, ``group_size``, ``symmetric``); its key is then the name
    fixed: tuple[tuple[str, Any], ...] = ()
    #: ``storage_bits(fmt, in_features)``: exact stored bits per weight (default: per-group fp16 scale/zero)
    storage_bits: Callable[[Format, int], float] | None = None
    #: whether the formats read ``importance`` (then values depend on calibration data)
    uses_importance: bool = False
    #: what importance it reads: "columns" (``[in]``, the imatrix; given a Gram matrix it
    #: takes the diagonal) or "gram" (``[in, in]``, the layer input's X^T X / n, for GPTQ)
    importance_kind: str = "columns"
    #: the plan targets its formats may be given to (:data:`mpsearch.core.plan.TARGETS`)
    targets: tuple[str, ...] = ("weight",)
    #: ``check_params(params)`` raises :class:`FormatError` for a value of its ``params`` it cannot take
    check_params: Callable[[dict[str, Any]], None] | None = None

    def check(self, fmt: Format) -> None:
        extra = sorted(set(dict(fmt.params)) - set(self.params))
        if extra:
            allowed = ", ".join(self.params) or "none"
            raise FormatError(f"quantizer {self.name!r} takes no params {extra} (allowed: {allowed})")
        for field_name, value in self.fixed:
            if getattr(fmt, field_name) != value:
                want = ", ".join(f"{k}={v!r}" for k, v in self.fixed)
                raise FormatError(
                    f"quantizer {self.name!r} has a fixed layout ({want}); got "
                    f"{field_name}={getattr(fmt, field_name)!r}"
                )
        outliers.check(fmt)
        if self.check_params is not None:
            self.check_params(dict(fmt.params))
        if fmt.is_full:
            return
        least = self.min_bits_symmetric if fmt.symmetric else self.min_bits
        if fmt.bits < least:
            kind = "symmetric" if fmt.symmetric else "asymmetric"
            raise FormatError(f"{kind} {self.name} quantization needs at least {least} bits, got {fmt.bits}")

    def __call__(self, w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> torch.Tensor:
        """``w`` fake-quantized, on ``w``'s device (importance vectors, kept on the CPU, are moved there)."""
        if importance is not None:
            importance = importance.to(w.device)
        if importance is not None and importance.dim() == 2 and self.importance_kind == "columns":
            importance = importance.diagonal()  # the Gram matrix's diagonal is the imatrix
        if outliers.fraction(fmt):
            return outliers.dense_and_sparse(self.fn, w, fmt, importance)
        return self.fn(w, fmt, importance)

    def reads_importance(self, fmt: Format) -> bool:
        """Whether ``fmt``'s values depend on an importance vector (its search, or its outliers' salience)."""
        return not fmt.is_full and (self.uses_importance or outliers.fraction(fmt) > 0)

    # -------------------------------------------------------------- layout
    def bits_per_weight(self, fmt: Format, in_features: int) -> float:
        """Exact stored bits per weight of ``fmt`` on rows of ``in_features``."""
        extra = outliers.cost(fmt, in_features)
        if self.storage_bits is not None:
            return float(self.storage_bits(fmt, in_features)) + extra
        group = in_features if fmt.group_size == PER_CHANNEL else fmt.group_size
        return fmt.bits + (SCALE_BITS + (0 if fmt.symmetric else ZERO_BITS)) / group + extra

    def fits(self, fmt: Format, in_features: int) -> bool:
        """A group (or block) must tile the row."""
        return fmt.group_size == PER_CHANNEL or in_features % fmt.group_size == 0

    def key(self, fmt: Format) -> str:
        """Short readable label: the name where the layout fixes bits and group size
        (``q4_k``), else e.g. ``u4g64a`` or ``nf4g64s``."""
        if {"bits", "group_size"} <= {k for k, _ in self.fixed}:
            return self.name
        g = "ch" if fmt.group_size == PER_CHANNEL else str(fmt.group_size)
        prefix = "u" if self.name == "uniform" else self.name
        return f"{prefix}{fmt.bits}g{g}{'s' if fmt.symmetric else 'a'}{outliers.suffix(fmt)}"

    def default_fields(self) -> dict[str, Any]:
        """The fields a plan may leave out for this quantizer (its fixed layout)."""
        return dict(self.fixed)


@dataclass(frozen=True)
class TargetQuantizer(Quantizer):
    """A quantizer of run-time tensors (layer inputs, the KV cache) rather than stored weights.

    ``fn(x, fmt, calib)`` fake-quantizes ``x [tokens, channels]`` (``calib``: the tensors
    :meth:`calibrate` fitted, or None for a dynamic format). ``calibrate(x, g, fmt)`` fits
    them from calibration samples ``x`` (and their loss gradients ``g`` where
    ``wants_grads``); None for formats computed on the fly. ``storage(fmt, tokens, width,
    head_dim)`` is the exact bits stored for ``tokens`` vectors of ``width`` elements
    (KV formats; activations are transient and cost no memory). Keys are ``NAME<bits>``.
    """

    calibrate: Callable[..., dict[str, torch.Tensor]] | None = None
    wants_grads: bool = False
    storage: Callable[..., float] | None = None
    #: run-time quantizers see no weight rows: any width fits
    targets: tuple[str, ...] = ("input",)

    def __call__(self, x: torch.Tensor, fmt: Format, calib: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.fn(x, fmt, calib)

    def needs_calibration(self, fmt: Format, target: str | None = None) -> bool:
        return not fmt.is_full and self.calibrate is not None

    def reads_importance(self, fmt: Format) -> bool:
        return False

    def bits_per_weight(self, fmt: Format, in_features: int) -> float:
        return float(fmt.bits)

    def fits(self, fmt: Format, in_features: int) -> bool:
        return True

    def key(self, fmt: Format) -> str:
        extra = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in fmt.params)
        g = "" if fmt.group_size == PER_CHANNEL else f"g{fmt.group_size}"
        return f"{self.name}{fmt.bits}{g}" + (f"[{extra}]" if extra else "")

    def default_fields(self) -> dict[str, Any]:
        return {"group_size": PER_CHANNEL, "symmetric": True}


def groups_of(
    w: torch.Tensor, fmt: Format, importance: torch.Tensor | None, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` as float32 groups ``[out, in/g, g]`` and the importance broadcast to
    them (ones without one); errors name the quantizer and what does not fit."""
    if w.dim() != 2:
        raise FormatError(f"{name} quantizer expects a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if not fmt.fits(in_f):
        raise FormatError(f"group size {fmt.group_size} does not divide the input dimension {in_f}")
    g = fmt.group_len(in_f)
    x = w.detach().to(torch.float32).reshape(out_f, in_f // g, g)
    if importance is None:
        return x, torch.ones(1, in_f // g, g, device=x.device)
    if importance.shape != (in_f,):
        raise FormatError(f"importance must have shape ({in_f},), got {tuple(importance.shape)}")
    return x, importance.detach().to(device=x.device, dtype=torch.float32).clamp_min(0).reshape(1, in_f // g, g) + 1e-12


def quantize(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize ``w`` with ``fmt``; 16 bits returns the tensor unchanged.

    ``importance`` (``[in_features]``, e.g. the layer input's second moments, which is
    what llama.cpp's imatrix holds) weights each column's error in quantizers that
    search their scales; the others ignore it.
    """
    if fmt.is_full:
        return w.detach().clone()
    return get_quantizer(fmt.quantizer)(w, fmt, importance)


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
