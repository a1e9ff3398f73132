"""BOPs: MACs x weight bits x input bits per forward of ``workload.tokens`` tokens (HAWQ-V3,
Baskin et al.). Nominal bits: an unquantized tensor or a float input counts 16."""

from __future__ import annotations

from ..core.format import Format
from ..core.registry import register
from ..core.space import Member
from .model import CostModel, weight_bits


@register("cost", "bops")
class Bops(CostModel):
    name = "bops"

    def member(self, m: Member, fmt: Format) -> float:
        return float(m.numel) * self.workload.tokens * weight_bits(fmt) * self.workload.act_bits

    def fixed(self) -> float:
        s = self.shape  # the LM head, unquantized (16 x input bits)
        return float(s.vocab * s.hidden) * self.workload.tokens * 16 * self.workload.act_bits
