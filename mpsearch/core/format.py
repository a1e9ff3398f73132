"""A number format for one tensor: bits, group size, symmetry, quantizer kind.

Effective bits are the stored bits per weight, and the format's quantizer owns them:
for round-to-nearest uniform they count the per-group fp16 scale and, when
asymmetric, the fp16 zero point (4-bit asymmetric with groups of 64 is 4 + 32/64 =
4.5); a GGUF type counts its block layout exactly (Q4_K is 4.5, Q3_K 3.4375).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from . import registry
from .registry import UnknownComponentError

#: ``group_size`` value meaning one group per output row (per-channel)
PER_CHANNEL = -1
#: ``bits`` value meaning "leave the tensor unquantized" (stored as fp16)
FULL_BITS = 16


def _is_int(v: Any) -> bool:
    """True for integers; ``True``/``False`` are not sizes."""
    return isinstance(v, int) and not isinstance(v, bool)


class FormatError(ValueError):
    """A format that is malformed or does not fit the tensor it is given to."""


@dataclass(frozen=True)
class Format:
    """How one tensor is stored. ``bits == 16`` means unquantized."""

    bits: int
    group_size: int = 64
    symmetric: bool = False
    quantizer: str = "uniform"
    params: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or not 1 <= self.bits <= FULL_BITS:
            raise FormatError(f"bits must be an integer in 1..{FULL_BITS}, got {self.bits!r}")
        if not _is_int(self.group_size) or (self.group_size < 1 and self.group_size != PER_CHANNEL):
            raise FormatError(
                f"group_size must be a positive integer or {PER_CHANNEL} (per channel), got {self.group_size!r}"
            )
        if not isinstance(self.symmetric, bool):
            raise FormatError(f"symmetric must be true or false, got {self.symmetric!r}")
        if not isinstance(self.quantizer, str):
            raise FormatError(f"quantizer must be a name, got {self.quantizer!r}")
        for k, v in self.params:
            if not isinstance(k, str) or not (v is None or isinstance(v, (bool, int, float, str))):
                raise FormatError(f"params: {k!r} must map to a number, string or boolean, got {v!r}")
        try:  # the quantizer decides what it accepts
            registry.get("quantizer", self.quantizer).check(self)
        except UnknownComponentError as e:
            raise FormatError(str(e)) from None

    @property
    def is_full(self) -> bool:
        """True for the unquantized format."""
        return self.bits >= FULL_BITS

    @staticmethod
    def full() -> "Format":
        return Format(bits=FULL_BITS, group_size=PER_CHANNEL, symmetric=True, quantizer="none")

    def _quantizer(self):
        return registry.get("quantizer", self.quantizer)

    def fits(self, in_features: int) -> bool:
        """Whether the layout tiles a row of ``in_features`` (a group size must divide it)."""
        return self.is_full or self._quantizer().fits(self, in_features)

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == PER_CHANNEL else self.group_size

    def effective_bits(self, in_features: int) -> float:
        """Stored bits per weight, as the quantizer's layout counts them (scales, zeros, super-blocks)."""
        if self.is_full:
            return float(FULL_BITS)
        return self._quantizer().bits_per_weight(self, in_features)

    @property
    def key(self) -> str:
        """Short readable label, e.g. ``u4g64a``, ``q4_k`` or ``fp16``."""
        return "fp16" if self.is_full else self._quantizer().key(self)

    @staticmethod
    def parse(key: str) -> "Format":
        """The format a key names: ``fp16``, a fixed-layout quantizer (``q4_k``) or
        ``u4g64a``-style (``{u|NAME}{bits}g{group|ch}{a|s}``)."""
        import re

        if key == "fp16":
            return Format.full()
        if key in registry.names("quantizer"):
            q = registry.get("quantizer", key)
            if {"bits", "group_size"} <= set(q.default_fields()):
                return Format(quantizer=key, **q.default_fields())
        t = re.fullmatch(r"([a-z][a-z_]*?)(\d+)(?:g(\d+))?", key)  # a run-time quantizer: tok8, kvquant3, kvtok4g32
        if (
            t
            and t.group(1) in registry.names("quantizer")
            and hasattr(registry.get("quantizer", t.group(1)), "calibrate")
        ):
            fields = registry.get("quantizer", t.group(1)).default_fields()
            if t.group(3):
                fields["group_size"] = int(t.group(3))
            return Format(bits=int(t.group(2)), quantizer=t.group(1), **fields)
        m = re.fullmatch(r"([a-z][a-z0-9_]*?)(\d+)g(\d+|ch)([as])(?:\+o(\d+(?:\.\d+)?))?", key)
        if not m:
            raise FormatError(f"{key!r} is not a format key (e.g. 'u4g64a', 'q4_k', 'fp16', 'u3g64a+o0.5')")
        name = "uniform" if m.group(1) == "u" else m.group(1)
        try:
            registry.get("quantizer", name)
        except UnknownComponentError as e:
            raise FormatError(f"format {key!r}: {e}") from None
        group = PER_CHANNEL if m.group(3) == "ch" else int(m.group(3))
        params = (("outliers", float(m.group(5)) / 100),) if m.group(5) else ()
        return Format(int(m.group(2)), group, m.group(4) == "s", name, params)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = dict(self.params)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "format") -> "Format":
        """Build from a plan's JSON; errors name the offending key."""
        if not isinstance(d, dict):
            raise FormatError(f"{where}: expected an object, got {type(d).__name__}")
        known = {"bits", "group_size", "symmetric", "quantizer", "params"}
        extra = set(d) - known
        if extra:
            raise FormatError(f"{where}: unknown key(s) {sorted(extra)}; allowed: {sorted(known)}")
        if "bits" not in d and "quantizer" in d:  # a fixed layout (e.g. {"quantizer": "q4_k"}) supplies the rest
            try:
                d = {**registry.get("quantizer", d["quantizer"]).default_fields(), **d}
            except (UnknownComponentError, TypeError) as e:
                raise FormatError(f"{where}: {e}") from None
        if "bits" not in d:
            raise FormatError(f"{where}: missing key 'bits'")
        params = d.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise FormatError(f"{where}.params: expected an object")
        if not _is_int(d["bits"]):
            raise FormatError(f"{where}.bits: must be an integer in 1..{FULL_BITS}, got {d['bits']!r}")
        try:
            return Format(
                bits=d["bits"],
                group_size=d.get("group_size", PER_CHANNEL if d["bits"] == FULL_BITS else 64),
                symmetric=d.get("symmetric", d["bits"] == FULL_BITS),
                quantizer=d.get("quantizer", "none" if d["bits"] == FULL_BITS else "uniform"),
                params=tuple(sorted(params.items())),
            )
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
