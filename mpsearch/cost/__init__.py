"""Costs of plans: effective bits per weight and bytes, counting scales and zeros.

Budgets are over the decision tensors (the quantizable linears); tensors outside the
search space stay in their original precision and are reported separately.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..core.format import Format
from ..core.space import Decision, decision_costs, plan_bits, plan_bytes  # noqa: F401  (costs of plans, read here too)

log = logging.getLogger(__name__)


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
    def parse(text: str, decisions: list[Decision], base: Format | None) -> "Budget":
        """``3.5`` (bits/weight) | ``48MB``/``500KB``/``1000B`` | ``uniform:3[:128]`` | ``uniform:q4_k`` | ``recipe:4``.

        ``uniform:B[:G]`` is the effective bits of the uniform B-bit plan with groups of G
        (default: the space's base group size): "the same size as uniform 3-bit".
        ``uniform:KEY`` is every tensor in the format KEY (``q4_k``, ``u4g64a``).
        ``recipe:B`` is the size of the llama.cpp-style recipe with B bits for most tensors
        and B+2 for attention V / FFN down in the chosen layers (``recipe:4`` ~ Q4_K_M).
        Baselines honour the search space's rules (pins, bit bounds), see
        :func:`mpsearch.solvers.baselines.uniform_formats`.
        """
        from ..solvers.baselines import natural_recipe, uniform_formats  # baselines build on costs

        kind, t, args = parse_budget_text(text)
        members = [mm for d in decisions for mm in d.members]
        if kind == "uniform_format":
            try:
                fmts = uniform_formats(decisions, args[0])
            except ValueError as e:
                raise BudgetError(f"budget {t}: {e}") from None
            return Budget("bits", plan_bits(fmts, members), t, fmts, f"uniform-{args[0].key}")
        if base is None and kind in ("recipe", "uniform"):
            raise BudgetError(
                f"budget {t}: this search space lists its formats instead of a bits x group grid; "
                "name one (uniform:q4_k) or give bits per weight (4.5) or a size (48MB)"
            )
        if kind == "recipe":
            fmts = natural_recipe(decisions, base, args[0])
            return Budget("bits", plan_bits(fmts, members), t, fmts, f"recipe-{args[0]}bit")
        if kind == "uniform":
            bits, group = args
            try:
                fmt = Format(bits, group if group is not None else base.group_size, base.symmetric, base.quantizer)
                fmts = uniform_formats(decisions, fmt)
            except ValueError as e:
                raise BudgetError(f"budget {t}: {e}") from None
            other = [n for n, f in fmts.items() if f != fmt]
            if other:  # the rules or the space's grid leave them another format: the budget is not quite "uniform"
                log.warning(
                    "budget %s: %d of %d tensors may not take %s in this space (e.g. %s gets %s); the budget is the "
                    "size "
                    "of the plan with the nearest formats they may take",
                    t,
                    len(other),
                    len(fmts),
                    fmt.key,
                    other[0],
                    fmts[other[0]].key,
                )
            return Budget("bits", plan_bits(fmts, members), t, fmts, f"uniform-{fmt.key}")
        if kind == "bytes":
            return Budget("bytes", args[0], t)
        return Budget("bits", args[0], t)


_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def parse_budget_text(text: str) -> tuple[str, str, tuple]:
    """Read a budget without a model: ``(kind, text, args)``; every error says what is wrong.

    Called when the configuration is built, so a typo fails before the model loads.
    """
    t = str(text).strip()
    how = (
        "use bits per weight (3.5), a size (48MB), uniform:BITS[:GROUP], uniform:FORMAT (e.g. uniform:q4_k) or "
        "recipe:BITS"
    )
    m = re.fullmatch(r"recipe:(\d+)", t)
    if m:
        if not 1 <= int(m[1]) <= 8:
            raise BudgetError(f"budget {t}: the recipe's bits must be 1..8, got {m[1]}")
        return "recipe", t, (int(m[1]),)
    m = re.fullmatch(r"uniform:(\d+)(?::(-?\d+))?", t)
    if m:
        bits, group = int(m[1]), (int(m[2]) if m[2] else None)
        if not 1 <= bits <= 15:
            raise BudgetError(f"budget {t}: uniform bits must be 1..15, got {bits}")
        if group is not None and group < 1 and group != -1:
            raise BudgetError(f"budget {t}: the group size must be positive or -1 (per channel), got {group}")
        return "uniform", t, (bits, group)
    m = re.fullmatch(r"uniform:([a-z][a-z0-9_]*)", t)
    if m:
        try:
            fmt = Format.parse(m[1])
        except ValueError as e:
            raise BudgetError(f"budget {t}: {e}") from None
        return "uniform_format", t, (fmt,)
    if t.lower().startswith(("uniform", "recipe")):
        raise BudgetError(f"cannot read budget {text!r}: {how}")
    m = re.fullmatch(r"([-+0-9.eE]+|nan|inf)\s*(KB|MB|GB|B)", t, re.IGNORECASE)
    number, unit = (m[1], m[2].upper()) if m else (t, None)
    try:
        value = float(number)
    except ValueError:
        raise BudgetError(f"cannot read budget {text!r}: {how}") from None
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(
            f"budget {text!r} must be a positive number ({'a size' if unit else 'bits per weight'}), got {value}"
        )
    if unit:
        return "bytes", t, (value * _UNITS[unit],)
    return "bits", t, (value,)
