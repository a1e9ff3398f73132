"""Latency from this machine's measured kernel table (``mpsearch profile-device``), not a model.

Each decision tensor costs the fastest measured kernel for its shape and format; the fixed
part is what the deployed model's step takes beyond its linears. HAQ's argument: what a
format costs is what the hardware does with it, which bits alone do not say (on this CPU a
3-bit tensor runs slower than a 4-bit one: only 4 bits has a fused kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ..core.format import Format
from ..core.registry import register
from ..core.space import Member
from .model import CostModel

COLUMNS = ["kernel", "in_features", "out_features", "format", "tokens", "ms"]


@dataclass
class KernelTable:
    """Measured milliseconds per (kernel, layer shape, format, tokens), and the fixed part per model."""

    rows: pd.DataFrame
    fixed: dict[str, float] = field(default_factory=dict)
    machine: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # every plan's costs read one entry per tensor: index the rows once, not a table scan per tensor
        self._index: dict[tuple, dict[str, float]] = {}
        for k, i, o, f, t, ms in self.rows[COLUMNS].itertuples(index=False):
            self._index.setdefault((int(i), int(o), f, int(t)), {})[k] = float(ms)

    def timings(self, in_features: int, out_features: int, fmt: Format, tokens: int) -> dict[str, float]:
        """Milliseconds of each kernel measured for this layer shape, format and token count."""
        return dict(self._index.get((in_features, out_features, fmt.key, tokens), {}))

    def ms(self, in_features: int, out_features: int, fmt: Format, tokens: int) -> float:
        """The fastest measured kernel's time; an error names what is missing."""
        t = self.timings(in_features, out_features, fmt, tokens)
        if not t:
            raise KeyError(
                f"the kernel table has no timing for {fmt.key} on a {in_features} -> {out_features} layer at {tokens} "
                "tokens; "
                "run `mpsearch profile-device` with this model and space"
            )
        return min(t.values())


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
