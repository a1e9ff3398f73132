"""Costs of plans: effective bits per weight and bytes, counting scales and zeros.

Budgets are over the decision tensors (the quantizable linears); tensors outside the
search space stay in their original precision and are reported separately.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..format import Format
from ..space import Decision, Member


class BudgetError(ValueError):
    """A budget that cannot be parsed or cannot be met."""


@dataclass(frozen=True)
class Budget:
    """``metric`` is ``bits`` (effective bits per weight) or ``bytes``; ``label`` is what the user typed."""

    metric: str
    limit: float
    label: str = ""
    #: for ``uniform:B`` / ``recipe:B`` budgets: the plan that defines the size, and its name
    reference: dict[str, Format] | None = field(default=None, compare=False, repr=False)
    reference_name: str = ""

    def __post_init__(self) -> None:
        if self.metric not in ("bits", "bytes"):
            raise BudgetError(f"budget metric must be 'bits' or 'bytes', got {self.metric!r}")
        if not np.isfinite(self.limit) or self.limit <= 0:
            raise BudgetError(f"budget limit must be a positive number, got {self.limit!r}")

    def total_bits(self, numel: int) -> float:
        """The budget as total bits over ``numel`` decision weights."""
        return self.limit * numel if self.metric == "bits" else self.limit * 8.0

    def to_dict(self) -> dict:
        return {"metric": self.metric, "limit": self.limit, "label": self.label or str(self.limit)}

    @staticmethod
    def parse(text: str, decisions: list[Decision], base: Format) -> "Budget":
        """``3.5`` (bits/weight) | ``48MB``/``500KB``/``1000B`` | ``uniform:3[:128]`` | ``recipe:4``.

        ``uniform:B[:G]`` is the effective bits of the uniform B-bit plan with groups of G
        (default: the space's base group size): "the same size as uniform 3-bit".
        ``recipe:B`` is the size of the llama.cpp-style recipe with B bits for most tensors
        and B+2 for attention V / FFN down in the chosen layers (``recipe:4`` ~ Q4_K_M).
        """
        from ..baselines import natural_recipe, uniform_formats  # baselines build on costs

        t = str(text).strip()
        members = [mm for d in decisions for mm in d.members]
        m = re.fullmatch(r"recipe:(\d+)", t)
        if m:
            fmts = natural_recipe(members, base, int(m[1]))
            return Budget("bits", plan_bits(fmts, members), t, fmts, f"recipe-{m[1]}bit")
        m = re.fullmatch(r"uniform:(\d+)(?::(-?\d+))?", t)
        if m:
            fmt = Format(int(m[1]), int(m[2]) if m[2] else base.group_size, base.symmetric, base.quantizer)
            try:
                fmts = uniform_formats(decisions, fmt)
            except ValueError as e:
                raise BudgetError(f"budget {t}: {e}") from None
            return Budget("bits", plan_bits(fmts, members), t, fmts, f"uniform-{fmt.key}")
        m = re.fullmatch(r"([0-9.]+)\s*(KB|MB|GB|B)", t, re.IGNORECASE)
        if m:
            scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m[2].upper()]
            return Budget("bytes", float(m[1]) * scale, t)
        try:
            return Budget("bits", float(t), t)
        except ValueError:
            raise BudgetError(f"cannot read budget {text!r}: use bits per weight (3.5), a size (48MB), uniform:BITS[:GROUP] or recipe:BITS") from None


def decision_costs(decisions: list[Decision]) -> list[np.ndarray]:
    """Total effective bits of each decision in each of its formats."""
    return [np.array([d.bits(j) for j in range(len(d.formats))], dtype=np.float64) for d in decisions]


def plan_bits(formats: dict[str, Format], members: list[Member]) -> float:
    """Effective bits per weight of ``formats`` over ``members`` (missing = unquantized, 16)."""
    total = sum(m.numel * (formats[m.name].effective_bits(m.in_features) if m.name in formats else 16.0) for m in members)
    return total / sum(m.numel for m in members)


def plan_bytes(formats: dict[str, Format], members: list[Member]) -> float:
    """Storage of the decision tensors in bytes."""
    return plan_bits(formats, members) * sum(m.numel for m in members) / 8.0
