"""What the integer weight-only quantizers (GPTQModel, AutoRound, compressed-tensors, torchao)
can express: ``bits`` in a target's set, a group size or per-channel, symmetric or not.

mpsearch's uniform formats (RTN ``uniform``, clipped RTN ``clip``, ``gptq``) are such
schemes: the target stores integer codes with a scale (and a zero point when
asymmetric) per group, whichever algorithm chose them. Everything else (GGUF block
types, NormalFloat, log, k-means, outliers) is not; :func:`plan_schemes` refuses it
with the tensor's name, or with ``nearest=True`` maps it to the integer scheme nearest in
effective bits and reports every change it made.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from ..core.format import PER_CHANNEL, Format
from ..core.layers import matrix_shape
from ..models import load_model
from ..quant import outliers
from ..quant.apply import check_plan
from .base import ExportError

log = logging.getLogger(__name__)
#: quantizers whose format is a plain integer grid with a scale (and zero) per group
INTEGER_QUANTIZERS = frozenset({"uniform", "clip", "gptq", "affine"})


@dataclass(frozen=True)
class IntScheme:
    """Integer weight quantization: ``group_size`` None means one scale per output channel."""

    bits: int
    group_size: int | None
    symmetric: bool

    def gptq_fields(self) -> dict:
        """``{bits, group_size (-1 = per channel), sym}``: how GPTQModel and AutoRound spell a scheme."""
        return {"bits": self.bits, "group_size": self.group_size or -1, "sym": self.symmetric}

    @property
    def label(self) -> str:
        return f"w{self.bits}{'g' + str(self.group_size) if self.group_size else 'ch'}{'s' if self.symmetric else 'a'}"


def int_scheme(
    tensor: str, fmt: Format, bits_allowed: frozenset[int], quantizers: frozenset[str] = INTEGER_QUANTIZERS
) -> IntScheme:
    """The scheme of an integer format, or an :class:`ExportError` naming the tensor."""
    if fmt.quantizer not in quantizers:
        what = (
            "is not an integer grid with per-group scales"
            if fmt.quantizer not in INTEGER_QUANTIZERS
            else f"is not this target's grid (it quantizes in {sorted(quantizers)} formats)"
        )
        raise ExportError(
            f"tensors[{tensor!r}].weight: format {fmt.key} (quantizer {fmt.quantizer}) {what}; "
            f"pass --nearest to map it to the nearest format the target has"
        )
    if outliers.fraction(fmt):
        raise ExportError(
            f"tensors[{tensor!r}].weight: format {fmt.key} keeps {outliers.fraction(fmt):.3g} of its weights as fp16 "
            "outliers beside the integer grid, which this target cannot store; pass --nearest to export the grid "
            "alone (the outliers then round with the rest)"
        )
    if fmt.bits not in bits_allowed:
        raise ExportError(
            f"tensors[{tensor!r}].weight: {fmt.bits}-bit weights are not expressible "
            f"(this target takes {sorted(bits_allowed)} bits); pass --nearest to map them"
        )
    return IntScheme(fmt.bits, None if fmt.group_size == PER_CHANNEL else fmt.group_size, fmt.symmetric)


def nearest(
    tensor: str, fmt: Format, in_features: int, bits_allowed: frozenset[int], groups: tuple[int, ...] = (128, 64, 32)
) -> IntScheme:
    """The expressible integer scheme nearest ``fmt`` in effective bits (ties: fewer bits)."""
    options = [
        Format(bits=b, group_size=g, symmetric=fmt.symmetric)
        for b in sorted(bits_allowed)
        for g in groups
        if in_features % g == 0
    ]
    if not options:
        raise ExportError(f"tensors[{tensor!r}].weight: no group of {groups} divides its input dimension {in_features}")
    best = min(options, key=lambda f: (abs(f.effective_bits(in_features) - fmt.effective_bits(in_features)), f.bits))
    return IntScheme(best.bits, best.group_size, best.symmetric)


def plan_schemes(
    plan,
    model: str,
    bits_allowed: frozenset[int],
    nearest_ok: bool = False,
    check: bool = True,
    quantizers: frozenset[str] = INTEGER_QUANTIZERS,
):
    """Per planned tensor its :class:`IntScheme` (None: left unquantized), every change
    ``--nearest`` made (``(tensor, from_key, to_label)``), and the loaded model. ``quantizers``
    are the formats the target reproduces exactly (torchao: only ``affine``)."""
    lm = load_model(model)
    resolved = check_plan(lm.model, plan, check)
    modules = dict(lm.model.named_modules())
    out: dict[str, IntScheme | None] = {}
    changes: list[tuple[str, str, str]] = []
    for name, fmt in sorted(resolved.weight_formats().items()):
        if fmt.is_full:
            out[name] = None
            continue
        try:
            out[name] = int_scheme(name, fmt, bits_allowed, quantizers)
        except ExportError:
            if not nearest_ok:
                raise
            if (
                fmt.quantizer in INTEGER_QUANTIZERS and fmt.bits in bits_allowed
            ):  # another integer grid, or outliers: same bits and groups
                out[name] = int_scheme(name, outliers.without(fmt), bits_allowed)
            else:
                out[name] = nearest(name, fmt, matrix_shape(modules[name])[1], bits_allowed)
            changes.append((name, fmt.key, out[name].label))
            log.warning("--nearest: %s %s -> %s", name, fmt.key, out[name].label)
    _warn_split_fusions(out)
    return out, changes, lm


def _warn_split_fusions(schemes: dict) -> None:
    """vLLM fuses q/k/v (and gate/up) into one matrix with one scheme: warn, naming them, where a plan splits them."""
    groups: dict[str, set] = {}
    for name, s in schemes.items():
        m = re.fullmatch(r"(.*\.(?:self_attn|attn))\.[qkv]_proj|(.*\.mlp)\.(?:gate|up)_proj", name)
        if m:
            groups.setdefault(m[1] or m[2], set()).add(s)
    for prefix, found in sorted(groups.items()):
        if len(found) > 1:
            log.warning(
                "%s: the fused projections get different formats %s; vLLM loads them fused with one format",
                prefix,
                sorted(str(x.label if x else "fp16") for x in found),
            )
