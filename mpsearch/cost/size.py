"""Bytes: storage of the decision tensors, scales and zeros included (what ``--budget 48MB`` bounds)."""

from __future__ import annotations

from ..core.format import Format
from ..core.registry import register
from ..core.space import Member
from .model import CostModel, weight_bytes


@register("cost", "bytes")
class Bytes(CostModel):
    name = "bytes"
    unit_family = "B"

    def member(self, m: Member, fmt: Format) -> float:
        return weight_bytes(m, fmt)
