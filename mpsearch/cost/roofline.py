"""Roofline latency per layer: time = max(operations / peak(compute type), bytes / bandwidth).

``latency_decode``: one decode step of ``workload.batch`` sequences at ``workload.context``
tokens (reads every weight once, and the KV cache). ``latency_prefill``: a prompt of
``workload.prefill`` tokens per sequence. Each linear is one kernel; what lies outside the
decisions (the LM head, attention) is the fixed part. No launch overheads, no overlap:
a lower bound that the measured table (:mod:`mpsearch.cost.measured`) checks.
"""

from __future__ import annotations

from ..core.format import Format
from ..core.registry import register
from ..core.space import Member
from .model import CostModel, weight_bits, weight_bytes


class _Roofline(CostModel):
    unit, display, needs, unit_family = "ms", 1e3, "roofline", "s"

    def kernel_s(self, ops: float, nbytes: float, compute: str) -> float:
        hw = self.hardware
        return max(ops / hw.peak[compute], nbytes / hw.bandwidth)

    def member(self, m: Member, fmt: Format) -> float:
        a = self.workload.act_bits
        act_bytes = self.tokens * (m.in_features + m.out_features) * a / 8.0
        return self.kernel_s(
            2.0 * m.numel * self.tokens,
            weight_bytes(m, fmt) + act_bytes,
            self.hardware.compute_type(weight_bits(fmt), a),
        )

    def fixed(self) -> float:
        s, w, t = self.shape, self.workload, self.tokens
        if not s.layers:
            return 0.0
        ft = self.hardware.float_type
        head_rows = w.batch if not self.decode else t  # prefill: logits of the last token only
        head = self.kernel_s(2.0 * s.vocab * s.hidden * head_rows, 2.0 * s.vocab * s.hidden, ft)
        keys = w.context if self.decode else w.prefill  # attention reads (decode) or builds (prefill) the cache
        span = keys if self.decode else keys / 2  # causal prefill: half the score matrix
        attn_ops = 2 * 2.0 * s.heads * s.head_dim * span * t * s.layers
        kv_bytes = 2.0 * s.kv_elements * keys * w.batch
        return head + self.kernel_s(attn_ops, kv_bytes, ft)


@register("cost", "latency_decode")
class LatencyDecode(_Roofline):
    name = "latency_decode"
    decode = True


@register("cost", "latency_prefill")
class LatencyPrefill(_Roofline):
    name = "latency_prefill"
    decode = False
