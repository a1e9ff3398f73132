"""Energy of one forward of ``workload.tokens`` tokens from a per-operation table (default:
Horowitz, ISSCC 2014, 45 nm; ``hardware/horowitz-45nm.toml`` says what is extrapolated).

Per decision tensor: every MAC (a multiply and a 32-bit accumulate; in fp16 for a float
input) plus reading its stored bytes once from DRAM. The fixed part is the unquantized LM
head and reading the KV cache at ``workload.context`` tokens in fp16.
"""

from __future__ import annotations

from ..core.format import Format
from ..core.registry import register
from ..core.space import Member
from .model import CostModel, weight_bits, weight_bytes

PJ = 1e-12


@register("cost", "energy")
class Energy(CostModel):
    name = "energy"
    unit, display, needs, unit_family = "mj", 1e3, "energy", "J"

    def mac_pj(self, w_bits: int, a_bits: int) -> float:
        e = self.hardware.energy_pj
        if a_bits >= 16:  # weight-only: dequantize, multiply and add in fp16
            return e["fp16_mult"] + e["fp16_add"]
        return e["int8_mult"] * (w_bits * a_bits) / 64.0 + e["int32_add"]

    def dram_pj_per_byte(self) -> float:
        return self.hardware.energy_pj["dram_read_32bit"] / 4.0

    def member(self, m: Member, fmt: Format) -> float:
        macs = float(m.numel) * self.workload.tokens
        return (
            macs * self.mac_pj(weight_bits(fmt), self.workload.act_bits)
            + weight_bytes(m, fmt) * self.dram_pj_per_byte()
        ) * PJ

    def fixed(self) -> float:
        s = self.shape
        head = float(s.vocab * s.hidden)
        kv_bytes = 2.0 * s.kv_elements * self.workload.context * self.workload.tokens
        attn_macs = 2.0 * s.layers * s.heads * s.head_dim * self.workload.context * self.workload.tokens
        return (
            head * self.workload.tokens * self.mac_pj(16, 16)
            + 2.0 * head * self.dram_pj_per_byte()
            + attn_macs * self.mac_pj(16, 16)
            + kv_bytes * self.dram_pj_per_byte()
        ) * PJ
