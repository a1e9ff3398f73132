"""Hardware profiles: peak throughput, memory bandwidth and energy per operation, each with its source.

A profile is a TOML file in ``hardware/`` (or any path). ``local`` is this machine,
measured by ``mpsearch profile-device`` (:mod:`mpsearch.run.profile`) and cached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from ..core.files import shipped, write_text_atomic

BUILTIN = shipped("hardware")
#: compute types a peak may be given for, from the narrowest
COMPUTE_TYPES = ("int4", "int8", "fp8", "fp16", "bf16", "fp32")


class HardwareError(ValueError):
    """A profile that cannot be found or read, or lacks a number a cost model needs."""


@dataclass(frozen=True)
class Hardware:
    """``peak``: dense operations per second per compute type; ``bandwidth``: bytes per second;
    ``energy_pj``: picojoules per operation; ``sources``: where each number comes from."""

    name: str
    kind: str = "gpu"
    description: str = ""
    float_type: str = "fp16"
    peak: dict[str, float] = field(default_factory=dict)
    bandwidth: float = 0.0
    energy_pj: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def __post_init__(self) -> None:
        bad = sorted(set(self.peak) - set(COMPUTE_TYPES))
        if bad:
            raise HardwareError(
                f"hardware {self.name!r}: unknown compute types {bad}; known: {', '.join(COMPUTE_TYPES)}"
            )
        for k, v in {**self.peak, "bandwidth": self.bandwidth, **self.energy_pj}.items():
            if not isinstance(v, (int, float)) or v < 0:
                raise HardwareError(f"hardware {self.name!r}: {k} must be a number >= 0, got {v!r}")
        if self.peak and self.float_type not in self.peak:
            raise HardwareError(f"hardware {self.name!r}: float_type {self.float_type!r} has no peak")
        for what in (
            (("peak",) if self.peak else ())
            + (("bandwidth",) if self.bandwidth else ())
            + (("energy_pj",) if self.energy_pj else ())
        ):
            if not self.sources.get(what):
                raise HardwareError(f"hardware {self.name!r}: every number needs a source; [sources] has no {what!r}")

    def compute_type(self, w_bits: int, a_bits: int) -> str:
        """The compute type a (weight bits, input bits) matmul runs in: float inputs make a
        weight-only kernel (it dequantizes and computes in ``float_type``); integer inputs run
        in the narrowest integer type that holds both operands, when this hardware has one."""
        if a_bits < 16:
            for t in ("int4", "int8"):
                if t in self.peak and max(w_bits, a_bits) <= int(t[3:]):
                    return t
        return self.float_type

    def require(self, what: str) -> None:
        if what == "roofline" and (not self.peak or not self.bandwidth):
            raise HardwareError(
                f"hardware {self.name!r} ({self.path}) gives no peak throughput / bandwidth; a latency cost needs both"
            )
        if what == "energy" and not self.energy_pj:
            raise HardwareError(f"hardware {self.name!r} ({self.path}) gives no energy per operation ([energy_pj])")


def load_hardware(name: str | Path) -> Hardware:
    """A profile by name (``hardware/<name>.toml``) or by path; ``local``, this machine measured, is
    :func:`mpsearch.run.profile.hardware`'s."""
    if str(name) == "local":
        raise HardwareError(
            "the 'local' profile is measured on this machine: mpsearch.run.profile.hardware('local') gives it"
        )
    path = Path(name)
    if not path.suffix:
        path = BUILTIN / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(["local"] + sorted(p.stem for p in BUILTIN.glob("*.toml")))
        raise HardwareError(f"no hardware profile {str(name)!r}; known: {known}, or a path to a TOML file")
    return read_hardware(path)


def read_hardware(path: Path) -> Hardware:
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise HardwareError(f"{path}: {e}") from None
    known = {"name", "kind", "description", "float_type", "peak", "memory", "energy_pj", "sources"}
    if set(d) - known:
        raise HardwareError(f"{path}: unknown keys {sorted(set(d) - known)}; known: {sorted(known)}")
    return Hardware(
        name=d.get("name", path.stem),
        kind=d.get("kind", "gpu"),
        description=d.get("description", ""),
        float_type=d.get("float_type", "fp16"),
        peak={k: float(v) for k, v in d.get("peak", {}).items()},
        bandwidth=float(d.get("memory", {}).get("bandwidth", 0.0)),
        energy_pj={k: float(v) for k, v in d.get("energy_pj", {}).items()},
        sources={k: str(v) for k, v in d.get("sources", {}).items()},
        path=str(path),
    )


def write_hardware(hw: Hardware, path: Path) -> Path:
    """A profile as TOML (what ``profile-device`` writes for this machine)."""
    return write_text_atomic(path, hardware_toml(hw))


def hardware_toml(hw: Hardware) -> str:
    """The TOML text of a profile."""

    def table(name: str, d: dict) -> list[str]:
        return (
            [f"[{name}]"]
            + [f"{k} = {json.dumps(v) if isinstance(v, str) else format(float(v), '.6g')}" for k, v in d.items()]
            + [""]
        )

    lines = [f"{k} = {json.dumps(getattr(hw, k))}" for k in ("name", "kind", "description", "float_type")] + [""]
    lines += table("peak", hw.peak) + table("memory", {"bandwidth": hw.bandwidth})
    if hw.energy_pj:
        lines += table("energy_pj", hw.energy_pj)
    lines += table("sources", hw.sources)
    return "\n".join(lines) + "\n"
