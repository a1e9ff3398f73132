"""Cost models: what a plan costs on a piece of hardware, compiled to per-(tensor, format) tables.

A cost model prices one decision tensor in one format (:meth:`CostModel.member`) and
everything outside the decisions once (:meth:`CostModel.fixed`: the LM head, attention
over the KV cache). Totals are additive, so every cost compiles to a table the MILP reads
as a constraint row (:func:`constraint_for`). New cost models are one file with
``@register("cost", NAME)``.

Units inside are SI (bytes, operations, joules, seconds); ``display`` turns them into the
unit of the results column (``cost_energy_mj`` is millijoules).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..core import registry
from ..core.format import Format
from ..core.space import Decision, Member
from .hardware import Hardware


@dataclass(frozen=True)
class Workload:
    """What a forward pass processes. ``tokens``: tokens per forward for BOPs and energy (1: one
    decode step); ``batch``: sequences decoded at once; ``context``: tokens in the KV cache at a
    decode step; ``prefill``: prompt tokens; ``act_bits``: the layer inputs' bits (16: float)."""

    tokens: int = 1
    batch: int = 1
    context: int = 512
    prefill: int = 512
    act_bits: int = 16

    def __post_init__(self) -> None:
        for k in ("tokens", "batch", "context", "prefill", "act_bits"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"workload {k} must be an integer >= 1, got {v!r}")
        if self.act_bits > 16:
            raise ValueError(f"workload act_bits must be at most 16, got {self.act_bits}")


@dataclass(frozen=True)
class ModelShape:
    """The parts of a decoder outside the decisions that a step still pays for."""

    hidden: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    vocab: int = 0

    @staticmethod
    def of(model) -> "ModelShape":
        """Read from a Hugging Face config; a model without one (a CNN) has no fixed part."""
        c = getattr(model, "config", None)
        if c is None or not hasattr(c, "hidden_size"):
            return ModelShape()
        heads = c.num_attention_heads
        return ModelShape(
            c.hidden_size,
            c.num_hidden_layers,
            heads,
            getattr(c, "num_key_value_heads", None) or heads,
            getattr(c, "head_dim", None) or c.hidden_size // heads,
            c.vocab_size,
        )

    @property
    def kv_elements(self) -> int:
        """K and V elements per cached token, over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim


class CostModel(ABC):
    """Prices plans; see the module docstring."""

    name: ClassVar[str]
    #: results column suffix and the factor from SI to it (``ms``: 1e3)
    unit: ClassVar[str] = ""
    display: ClassVar[float] = 1.0
    #: what it needs from the hardware profile: "", "roofline", "energy" or "measured"
    needs: ClassVar[str] = ""
    #: "s", "J" or "B" for limits given with units; "" for counts (BOPs)
    unit_family: ClassVar[str] = ""
    #: latency costs: a decode step (True) or a prompt (False)
    decode: ClassVar[bool] = True

    def __init__(self, hardware: Hardware | None, workload: Workload, shape: ModelShape, profile=None) -> None:
        if self.needs in ("roofline", "energy"):
            if hardware is None:
                raise ValueError(f"cost {self.name!r} needs a hardware profile")
            hardware.require(self.needs)
        if self.needs == "measured" and profile is None:
            raise ValueError(f"cost {self.name!r} needs this machine's kernel table (mpsearch profile-device)")
        self.hardware, self.workload, self.shape, self.profile = hardware, workload, shape, profile

    @abstractmethod
    def member(self, m: Member, fmt: Format) -> float:
        """Cost of one decision tensor in one format (SI units)."""

    def fixed(self) -> float:
        """Cost of everything outside the decisions (SI units)."""
        return 0.0

    @property
    def tokens(self) -> int:
        """Tokens one timed forward runs: ``batch`` in a decode step, ``batch x prefill`` for a prompt."""
        w = self.workload
        return w.batch if self.decode else w.batch * w.prefill

    @property
    def column(self) -> str:
        return f"cost_{self.name}" + (f"_{self.unit}" if self.unit else "")

    def table(self, decisions: list[Decision]) -> list[np.ndarray]:
        """Per decision, per format: the summed cost of its members (SI units)."""
        return [np.array([sum(self.member(m, f) for m in d.members) for f in d.formats]) for d in decisions]

    def total(self, formats: dict[str, Format], members: list[Member]) -> float:
        return self.fixed() + sum(self.member(m, formats.get(m.name, Format.full())) for m in members)

    def breakdown(self, formats: dict[str, Format], members: list[Member]) -> dict[str, float]:
        """Cost per tensor kind (``q_proj``, ``down_proj``...) plus ``fixed``, in display units."""
        out: dict[str, float] = {}
        for m in members:
            kind = m.name.rsplit(".", 1)[-1]
            out[kind] = out.get(kind, 0.0) + self.member(m, formats.get(m.name, Format.full())) * self.display
        if self.fixed():
            out["fixed"] = self.fixed() * self.display
        return out


def weight_bits(fmt: Format) -> int:
    """Nominal bits of a weight format (16 when unquantized)."""
    return 16 if fmt.is_full else int(fmt.bits)


def weight_bytes(m: Member, fmt: Format) -> float:
    return m.numel * fmt.effective_bits(m.in_features) / 8.0


def cost_names() -> list[str]:
    return registry.names("cost")


def get_cost(name: str) -> type[CostModel]:
    return registry.get("cost", name)


# -- constraints from the command line ----------------------------------------------------
_SCALE = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_UNITS = {
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "J": 1.0,
    "mJ": 1e-3,
    "uJ": 1e-6,
    "nJ": 1e-9,
    "B": 1.0,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
}
#: the unit family each cost model's limit is given in
_FAMILY = {"s": ("s", "ms", "us"), "J": ("J", "mJ", "uJ", "nJ"), "B": ("B", "KB", "MB", "GB")}


@dataclass(frozen=True)
class ConstraintSpec:
    """``NAME<=VALUE[UNIT]`` as typed: ``latency_decode<=12ms``, ``energy<=0.5mJ``, ``bops<=2T``."""

    cost: str
    limit: float  # SI units
    text: str

    @staticmethod
    def parse(text: str) -> "ConstraintSpec":
        m = re.fullmatch(r"\s*([a-z_]+)\s*<=\s*([-+0-9.eE]+)\s*([a-zA-Z]*)\s*", str(text))
        known = cost_names()
        how = (
            "write NAME<=VALUE[UNIT], e.g. latency_decode<=12ms, energy<=25mJ, bops<=2T, bytes<=60MB; NAME is one "
            f"of {', '.join(known)}"
        )
        if not m:
            raise ValueError(f"cannot read constraint {text!r}: {how}")
        name, number, unit = m.groups()
        if name not in known:
            raise ValueError(f"constraint {text!r}: unknown cost {name!r}; {how}")
        value = float(number)
        base = get_cost(name).unit_family
        if base:
            if unit not in _FAMILY[base]:
                raise ValueError(
                    f"constraint {text!r}: {name} is limited in {'/'.join(_FAMILY[base])}, got {unit or 'no unit'!r}"
                )
            value *= _UNITS[unit]
        else:
            if unit not in _SCALE:
                raise ValueError(
                    f"constraint {text!r}: {name} is a count; use a plain number or a K/M/G/T suffix, got {unit!r}"
                )
            value *= _SCALE[unit]
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"constraint {text!r}: the limit must be a positive number")
        return ConstraintSpec(name, value, str(text).strip())
