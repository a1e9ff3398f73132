"""Kernels made of torch operators (CPU, and CUDA where the operator has one).

- ``dense``: the unquantized weight in bf16, ``F.linear``.
- ``dequant``: integer codes packed into bytes (4 per byte up to 2 bits, 2 per byte up to
  4 bits, 1 per byte up to 8), a scale and a minimum per group in bf16; every call unpacks,
  dequantizes and runs ``F.linear``. Runs every format; nothing is fused.
- ``int4pack``: torch's fused int4 weight-only matmul (the one torchao uses on CPU); 4-bit
  formats whose group (32..256) divides the row.
- ``int8pack``: torch's fused int8 weight-only matmul, one scale per output channel; 8-bit
  per-channel formats.
- ``int8dyn``: int8 x int8 with int32 accumulation (``torch._int_mm``), the input quantized per
  token on the fly; 8-bit per-channel weights. The int8 matmul path of a W8A8 plan.

Weights are re-encoded by min/max rounding at the format's bits and group, so a plan's
(already rounded) RTN weights come back up to bf16 rounding; other quantizers' formats run
as the uniform grid of their bits and group, which is what their storage costs to read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.format import Format
from ..core.registry import register
from .base import Kernel

COMPUTE = torch.bfloat16


def rtn_codes(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max codes [out, in] (uint8), scale and minimum [out, in/group]."""
    out, inp = w.shape
    g = w.float().reshape(out, inp // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, qmax)
    return q.reshape(out, inp).to(torch.uint8), scale, lo


def _per_byte(bits: int) -> int:
    return 4 if bits <= 2 else 2 if bits <= 4 else 1


@register("kernel", "dense")
class Dense(Kernel):
    def applies(self, fmt: Format, in_features: int, device: str) -> bool:
        return fmt.is_full

    def pack(self, weight: torch.Tensor, fmt: Format) -> dict[str, torch.Tensor]:
        return {"w": weight.to(COMPUTE).contiguous()}

    def run(self, x: torch.Tensor, packed: dict[str, torch.Tensor], fmt: Format) -> torch.Tensor:
        return F.linear(x.to(COMPUTE), packed["w"]).to(x.dtype)


@register("kernel", "dequant")
class Dequant(Kernel):
    def applies(self, fmt: Format, in_features: int, device: str) -> bool:
        return not fmt.is_full and fmt.bits <= 8 and in_features % fmt.group_len(in_features) == 0

    def pack(self, weight: torch.Tensor, fmt: Format) -> dict[str, torch.Tensor]:
        group = fmt.group_len(weight.shape[1])
        q, scale, lo = rtn_codes(weight, fmt.bits, group)
        per = _per_byte(fmt.bits)
        width = 8 // per
        q = q.reshape(q.shape[0], -1, per)
        packed = torch.zeros(q.shape[:2], dtype=torch.uint8, device=q.device)
        for i in range(per):
            packed |= q[..., i] << (i * width)
        return {"codes": packed.contiguous(), "scale": scale.to(COMPUTE), "lo": lo.to(COMPUTE)}

    def run(self, x: torch.Tensor, packed: dict[str, torch.Tensor], fmt: Format) -> torch.Tensor:
        codes, scale, lo = packed["codes"], packed["scale"], packed["lo"]
        per = _per_byte(fmt.bits)
        width = 8 // per
        mask = (1 << width) - 1
        q = (
            torch.stack([(codes >> (i * width)) & mask for i in range(per)], -1).reshape(codes.shape[0], -1)
            if per > 1
            else codes
        )
        out, inp = q.shape
        groups = scale.shape[1]
        w = (q.reshape(out, groups, inp // groups).to(COMPUTE) * scale[..., None] + lo[..., None]).reshape(out, inp)
        return F.linear(x.to(COMPUTE), w).to(x.dtype)


@register("kernel", "int4pack")
class Int4Pack(Kernel):
    def applies(self, fmt: Format, in_features: int, device: str) -> bool:
        group = fmt.group_len(in_features)
        return (
            device == "cpu"
            and not fmt.is_full
            and fmt.bits == 4
            and group in (32, 64, 128, 256)
            and in_features % group == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        )

    def pack(self, weight: torch.Tensor, fmt: Format) -> dict[str, torch.Tensor]:
        group = fmt.group_len(weight.shape[1])
        q, scale, lo = rtn_codes(weight, 4, group)
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # the operator computes (q - 8) * scale + zero, per group: zero = lo + 8 * scale
        sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(COMPUTE)
        return {"w": w, "sz": sz, "group": torch.tensor(group)}

    def run(self, x: torch.Tensor, packed: dict[str, torch.Tensor], fmt: Format) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(COMPUTE), packed["w"], int(packed["group"]), packed["sz"]
        ).to(x.dtype)


def _per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (weight.float().abs().amax(1) / 127).clamp_min(1e-8)
    return (weight.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


@register("kernel", "int8pack")
class Int8Pack(Kernel):
    def applies(self, fmt: Format, in_features: int, device: str) -> bool:
        return not fmt.is_full and fmt.bits == 8 and fmt.group_len(in_features) == in_features

    def pack(self, weight: torch.Tensor, fmt: Format) -> dict[str, torch.Tensor]:
        q, scale = _per_channel_int8(weight)
        return {"w": q.contiguous(), "scale": scale.to(COMPUTE)}

    def run(self, x: torch.Tensor, packed: dict[str, torch.Tensor], fmt: Format) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(COMPUTE), packed["w"], packed["scale"]).to(x.dtype)


@register("kernel", "int8dyn")
class Int8Dynamic(Kernel):
    def applies(self, fmt: Format, in_features: int, device: str) -> bool:
        return not fmt.is_full and fmt.bits == 8 and fmt.group_len(in_features) == in_features and in_features % 8 == 0

    def pack(self, weight: torch.Tensor, fmt: Format) -> dict[str, torch.Tensor]:
        q, scale = _per_channel_int8(weight)
        return {"wt": q.t().contiguous(), "scale": scale}

    def run(self, x: torch.Tensor, packed: dict[str, torch.Tensor], fmt: Format) -> torch.Tensor:
        xs = (x.float().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
        xq = (x.float() / xs).round().clamp(-127, 127).to(torch.int8)
        rows = xq.shape[0]
        if rows <= 16:  # the operator wants more than 16 rows: pad (the padding's cost is part of the path)
            xq = F.pad(xq, (0, 0, 0, 17 - rows))
        acc = torch._int_mm(xq, packed["wt"])[:rows]
        return (acc.float() * xs * packed["scale"]).to(x.dtype)
