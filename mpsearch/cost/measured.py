"""Latency from this machine's measured kernel table (``mpsearch profile-device``), not a model.

Each decision tensor costs the fastest measured kernel for its shape and format; the fixed
part is what the deployed model's step takes beyond its linears. HAQ's argument: what a
format costs is what the hardware does with it, which bits alone do not say (on this CPU a
3-bit tensor runs slower than a 4-bit one: only 4 bits has a fused kernel).
"""

from __future__ import annotations

from ..core.format import Format
from ..core.registry import register
from ..core.space import Member
from .model import CostModel


class _Measured(CostModel):
    unit, display, needs, unit_family = "ms", 1e3, "measured", "s"

    def member(self, m: Member, fmt: Format) -> float:
        return self.profile.ms(m.in_features, m.out_features, fmt, self.tokens) / 1e3

    def fixed(self) -> float:
        return self.profile.fixed["decode_ms" if self.decode else "prefill_ms"] / 1e3


@register("cost", "measured_decode")
class MeasuredDecode(_Measured):
    name = "measured_decode"
    decode = True


@register("cost", "measured_prefill")
class MeasuredPrefill(_Measured):
    name = "measured_prefill"
    decode = False
