"""The search space: which tensors are decisions and which formats each may take.

A space file (TOML, in ``search_spaces/``) names target modules by exact name or
``re:`` pattern, the candidate formats, tied groups and per-tensor rules (pin, bit
bounds, exclude). :meth:`SearchSpace.build` turns it into concrete decisions for one
model; allocators only ever see those indexed decisions, never modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from torch import nn

from . import registry
from .files import SPACE_BYTES, parse_toml, read_text, shipped
from .format import FULL_BITS, PER_CHANNEL, Format, FormatError
from .layers import check_types, kind_of, matrix_shape
from .patterns import PatternError, compile_pattern, fullmatch

log = logging.getLogger(__name__)


class SpaceError(ValueError):
    """A search-space file or rule that is malformed or matches nothing."""


def check_pattern(pattern: Any, where: str):
    """A name or a ``re:`` regex that compiles (returned; None for a name); the error names where it came from."""
    try:
        return compile_pattern(pattern, where)
    except PatternError as e:
        raise SpaceError(str(e)) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _list(table: dict, key: str, default: list, prefix: str = "") -> list:
    value = table.get(key, default)
    if not isinstance(value, list):
        raise SpaceError(f"{prefix}{key}: expected a list, got {value!r}")
    return value


def matches(pattern: str, name: str) -> bool:
    """Exact name, or ``re:<regex>`` matched in full (bounded in time: :mod:`mpsearch.core.patterns`)."""
    return bool(fullmatch(pattern, name))


@dataclass(frozen=True)
class Rule:
    """Restricts the formats of the tensors that ``match`` selects."""

    match: str
    pin: Format | None = None
    min_bits: int | None = None
    max_bits: int | None = None
    exclude: bool = False

    def __post_init__(self) -> None:
        check_pattern(self.match, "rule match")
        for name in ("min_bits", "max_bits"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 1 <= v <= FULL_BITS):
                raise SpaceError(f"rule {self.match!r}: {name} must be an integer in 1..{FULL_BITS}, got {v!r}")
        if not isinstance(self.exclude, bool):
            raise SpaceError(f"rule {self.match!r}: exclude must be true or false, got {self.exclude!r}")
        if self.pin is not None and not isinstance(self.pin, Format):
            raise SpaceError(f"rule {self.match!r}: pin must be a format, got {self.pin!r}")
        if not (self.pin or self.min_bits is not None or self.max_bits is not None or self.exclude):
            raise SpaceError(f"rule {self.match!r} says nothing: give pin, min_bits, max_bits or exclude")

    def allows(self, fmt: Format) -> bool:
        if self.pin is not None and fmt != self.pin:
            return False
        if self.min_bits is not None and fmt.bits < self.min_bits:
            return False
        if self.max_bits is not None and fmt.bits > self.max_bits:
            return False
        return True

    @staticmethod
    def parse_cli(kind: str, text: str, base: Format | None) -> "Rule":
        """``--pin NAME=BITS[:GROUP]`` or ``NAME=KEY`` (``q8_0``), ``--min-bits NAME=B``, ``--max-bits NAME=B``,
        ``--exclude NAME``."""
        if kind == "exclude":
            return Rule(match=text, exclude=True)
        name, sep, value = text.rpartition("=")
        if not sep or not name:
            raise SpaceError(f"--{kind.replace('_', '-')} expects NAME=VALUE, got {text!r}")
        try:
            if kind == "pin":
                if not value.split(":")[0].isdigit():  # a format key: --pin NAME=q8_0
                    return Rule(match=name, pin=Format.parse(value))
                if base is None:
                    raise ValueError("this space lists its formats: pin one by key, e.g. NAME=q8_0")
                bits, _, group = value.partition(":")
                b = int(bits)
                if not 1 <= b <= FULL_BITS:
                    raise ValueError(f"bits must be 1..{FULL_BITS} ({FULL_BITS} = unquantized), got {b}")
                if b == FULL_BITS:
                    return Rule(match=name, pin=Format.full())
                return Rule(match=name, pin=replace(base, bits=b, group_size=int(group) if group else base.group_size))
            return Rule(match=name, **{kind: int(value)})
        except SpaceError:
            raise
        except (ValueError, FormatError) as e:
            raise SpaceError(f"--{kind.replace('_', '-')} {text!r}: {e}") from None


@dataclass(frozen=True)
class Member:
    """One tensor inside a decision."""

    name: str
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class Decision:
    """One choice the allocator makes: a tensor, or a tied group sharing one format."""

    name: str
    members: tuple[Member, ...]
    formats: tuple[Format, ...]

    @property
    def numel(self) -> int:
        return sum(m.numel for m in self.members)

    def bits(self, j: int) -> float:
        """Total effective bits of all members in format ``j``."""
        return sum(m.numel * self.formats[j].effective_bits(m.in_features) for m in self.members)


def decision_costs(decisions: list[Decision]) -> list[np.ndarray]:
    """Total effective bits of each decision in each of its formats."""
    return [np.array([d.bits(j) for j in range(len(d.formats))], dtype=np.float64) for d in decisions]


def plan_bits(formats: dict[str, Format], members: list[Member]) -> float:
    """Effective bits per weight of ``formats`` over ``members`` (missing = unquantized, 16)."""
    total = sum(
        m.numel * (formats[m.name].effective_bits(m.in_features) if m.name in formats else 16.0) for m in members
    )
    return total / sum(m.numel for m in members)


def plan_bytes(formats: dict[str, Format], members: list[Member]) -> float:
    """Storage of the decision tensors in bytes."""
    return plan_bits(formats, members) * sum(m.numel for m in members) / 8.0


#: run-time targets a space file may add as tables, and the plan targets each one decides
RUNTIME_TABLES = {"input": ("input",), "kv_cache": ("k_cache", "v_cache")}


@dataclass(frozen=True)
class RuntimeTarget:
    """A ``[input]`` or ``[kv_cache]`` table: the formats every layer input / every layer's K and V may take."""

    table: str
    formats: tuple[Format, ...]
    include_full: bool = True
    min_bits: int | None = None

    def candidates(self) -> list[Format]:
        fmts = [f for f in self.formats if self.min_bits is None or f.bits >= self.min_bits]
        return fmts + [Format.full()] if self.include_full else fmts

    @staticmethod
    def from_table(table: str, data: Any) -> "RuntimeTarget":
        where = f"[{table}]"
        if not isinstance(data, dict) or set(data) - {"formats", "include_full", "min_bits"}:
            raise SpaceError(f"{where} takes formats, include_full and min_bits; got {data!r}")
        keys = _list(data, "formats", [], f"{table}.")
        if not keys or not all(isinstance(k, str) for k in keys):
            raise SpaceError(
                f"{table}.formats must be a non-empty list of format keys like 'tok8' or 'kvquant3', got {keys!r}"
            )
        fmts = tuple(Format.parse(k) for k in keys)
        for f in fmts:
            if not set(RUNTIME_TABLES[table]) <= set(registry.get("quantizer", f.quantizer).targets):
                raise SpaceError(f"{table}.formats: {f.key} is not a format for {' / '.join(RUNTIME_TABLES[table])}")
        mb = data.get("min_bits")
        if mb is not None and (not _is_int(mb) or not 1 <= mb <= FULL_BITS):
            raise SpaceError(f"{table}.min_bits must be an integer in 1..{FULL_BITS}, got {mb!r}")
        inc = data.get("include_full", True)
        if not isinstance(inc, bool):
            raise SpaceError(f"{table}.include_full must be true or false, got {inc!r}")
        out = RuntimeTarget(table, fmts, inc, mb)
        if not out.candidates():
            raise SpaceError(f"[{table}]: no format is left after min_bits = {mb}")
        return out


@dataclass(frozen=True)
class SearchSpace:
    """Declarative space; ``build(model)`` makes it concrete."""

    name: str = "custom"
    #: module types that can be decisions (:mod:`mpsearch.core.layers`): Linear, Conv1d, Conv2d, Conv1D
    types: tuple[str, ...] = ("Linear",)
    targets: tuple[str, ...] = (r"re:.*",)
    ignore: tuple[str, ...] = ()
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    group_sizes: tuple[int, ...] = (32, 64, 128)
    symmetric: bool = False
    quantizer: str = "uniform"
    include_full: bool = True
    #: an explicit list of formats (e.g. GGUF types) instead of the bits x group_sizes grid
    formats: tuple[Format, ...] = ()
    tie: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = field(default=())
    #: run-time targets (``[input]``, ``[kv_cache]`` tables): decided with the weights (:mod:`mpsearch.run.targets`)
    runtime: tuple[RuntimeTarget, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if not self.formats and (not self.bits or not self.group_sizes):
            empty = "bits" if not self.bits else "group_sizes"
            raise SpaceError(f"formats.{empty} is empty: the space offers no format to quantize with")
        for b in self.bits:
            if not _is_int(b) or not 1 <= b < FULL_BITS:
                raise SpaceError(f"bits: {b!r} is not an integer in 1..{FULL_BITS - 1}")
        for g in self.group_sizes:
            if not _is_int(g) or (g < 1 and g != PER_CHANNEL):
                raise SpaceError(f"group_sizes: {g!r} is not a positive integer or {PER_CHANNEL}")
        for kind in ("targets", "ignore", "tie"):
            if isinstance(getattr(self, kind), str):
                raise SpaceError(f"{kind}: expected a list of patterns, got the string {getattr(self, kind)!r}")
            for t in getattr(self, kind):
                check_pattern(t, kind)
        for t in self.tie:
            if not t.startswith("re:") or check_pattern(t, "tie").groups < 1:
                raise SpaceError(f"tie pattern {t!r} must be 're:' with a capture group naming the tied set")
        if not isinstance(self.include_full, bool):
            raise SpaceError(f"include_full must be true or false, got {self.include_full!r}")
        if isinstance(self.types, str) or not self.types:
            raise SpaceError(f"types: expected a non-empty list of layer types, got {self.types!r}")
        try:
            check_types(self.types)
        except ValueError as e:
            raise SpaceError(f"types: {e}") from None

    # ---------------------------------------------------------------- loading
    @staticmethod
    def from_file(path: str | Path) -> "SearchSpace":
        path = Path(path)
        if not path.exists():
            builtin = shipped("search_spaces", f"{path}.toml")
            if not builtin.exists():
                known = sorted(p.stem for p in builtin.parent.glob("*.toml"))
                raise SpaceError(f"no search space file {str(path)!r}; built-in spaces: {known}")
            path = builtin
        data = parse_toml(read_text(path, "search-space file", SPACE_BYTES, SpaceError), str(path), SpaceError)
        return SearchSpace.from_dict(data, source=str(path))

    @staticmethod
    def from_dict(data: dict[str, Any], source: str = "") -> "SearchSpace":
        """Build and check a space; every error names the file and the key."""
        where = source or "search space"
        try:
            return SearchSpace._from_dict(data, source)
        except (FormatError, SpaceError) as e:
            raise SpaceError(f"{where}: {e}") from None

    @staticmethod
    def _from_dict(data: dict[str, Any], source: str) -> "SearchSpace":
        known = {"name", "description", "types", "targets", "ignore", "formats", "tie", "rules", *RUNTIME_TABLES}
        extra = set(data) - known
        if extra:
            raise SpaceError(f"unknown key(s) {sorted(extra)}; allowed: {sorted(known)}")
        fm = data.get("formats", {})
        if not isinstance(fm, dict):
            raise SpaceError("[formats] must be a table")
        fknown = {"bits", "group_sizes", "symmetric", "quantizer", "include_full", "list"}
        if set(fm) - fknown:
            raise SpaceError(f"unknown key(s) in [formats]: {sorted(set(fm) - fknown)}; allowed: {sorted(fknown)}")
        listed: tuple[Format, ...] = ()
        if "list" in fm:
            clash = sorted({"bits", "group_sizes", "symmetric", "quantizer"} & set(fm))
            if clash:
                raise SpaceError(f"[formats]: 'list' names every format; it cannot be combined with {clash}")
            keys = _list(fm, "list", [], "formats.")
            if not keys or not all(isinstance(k, str) for k in keys):
                raise SpaceError(f"formats.list must be a non-empty list of format keys like 'q4_k', got {keys!r}")
            listed = tuple(Format.parse(k) for k in keys)
            if any(f.is_full for f in listed):
                raise SpaceError("formats.list: leave fp16 out and use include_full")
        base = Format(
            bits=4, group_size=64, symmetric=fm.get("symmetric", False), quantizer=fm.get("quantizer", "uniform")
        )
        rules = []
        for i, r in enumerate(_list(data, "rules", [])):
            rk = {"match", "pin", "min_bits", "max_bits", "exclude"}
            if not isinstance(r, dict) or set(r) - rk or "match" not in r:
                raise SpaceError(f"rules[{i}] needs 'match' and only {sorted(rk)}; got {r!r}")
            pin = r.get("pin")
            if isinstance(pin, str):
                pin = Format.parse(pin)
            elif pin is not None:
                if not isinstance(pin, dict):
                    raise SpaceError(f"rules[{i}].pin must be a table like {{bits = 8, group_size = 64}}, got {pin!r}")
                whole = pin.get("bits") == FULL_BITS or (
                    "quantizer" in pin and "bits" not in pin
                )  # fp16, or a fixed layout
                pin = Format.from_dict(pin if whole else {**base.to_dict(), **pin}, f"rules[{i}].pin")
            rules.append(
                Rule(
                    match=r["match"],
                    pin=pin,
                    min_bits=r.get("min_bits"),
                    max_bits=r.get("max_bits"),
                    exclude=r.get("exclude", False),
                )
            )
        return SearchSpace(
            name=str(data.get("name", Path(source).stem or "custom")),
            types=tuple(_list(data, "types", ["Linear"])),
            targets=tuple(_list(data, "targets", ["re:.*"])),
            ignore=tuple(_list(data, "ignore", [])),
            bits=tuple(_list(fm, "bits", [2, 3, 4, 5, 6, 8], "formats.")),
            group_sizes=tuple(_list(fm, "group_sizes", [32, 64, 128], "formats.")),
            symmetric=base.symmetric,
            quantizer=base.quantizer,
            include_full=fm.get("include_full", True),
            formats=listed,
            tie=tuple(_list(data, "tie", [])),
            rules=tuple(rules),
            runtime=tuple(RuntimeTarget.from_table(t, data[t]) for t in RUNTIME_TABLES if t in data),
            source=source,
        )

    def runtime_target(self, table: str) -> RuntimeTarget | None:
        return next((r for r in self.runtime if r.table == table), None)

    def with_runtime_min_bits(self, table: str, bits: int) -> "SearchSpace":
        """A copy whose ``[table]`` formats have at least ``bits`` (``--input-min-bits 8``: W-A8 at most)."""
        r = self.runtime_target(table)
        if r is None:
            raise SpaceError(f"search space {self.name!r} has no [{table}] table: nothing to bound")
        new = replace(r, min_bits=bits)
        if not new.candidates():
            raise SpaceError(f"[{table}]: no format has at least {bits} bits")
        return replace(self, runtime=tuple(new if x is r else x for x in self.runtime))

    def with_rules(self, rules: Iterable[Rule]) -> "SearchSpace":
        """A copy with extra rules applied after the file's own (command-line overrides)."""
        return replace(self, rules=self.rules + tuple(rules))

    @property
    def base_format(self) -> Format | None:
        """The grid's 4-bit format (what ``--pin NAME=8`` and ``uniform:3`` vary); None for a listed space."""
        if self.formats:
            return None
        return Format(bits=4, group_size=64, symmetric=self.symmetric, quantizer=self.quantizer)

    def candidate_formats(self) -> list[Format]:
        """The grid (or list) of formats, before per-tensor fitting and rules (a pin may add one)."""
        if self.formats:
            fmts = list(self.formats)
        else:
            fmts = [replace(self.base_format, bits=b, group_size=g) for b in self.bits for g in self.group_sizes]
        if self.include_full:
            fmts.append(Format.full())
        return fmts

    # --------------------------------------------------------------- building
    def members(self, model: nn.Module) -> list[Member]:
        """Every layer of the space's ``types`` that the targets select and ignore does not,
        with its weight's shape as a matrix ``[out, fan_in]`` (:mod:`mpsearch.core.layers`)."""
        out = []
        for name, mod in model.named_modules():
            kind = kind_of(mod)
            if (
                kind is not None
                and kind.name in self.types
                and any(matches(t, name) for t in self.targets)
                and not any(matches(t, name) for t in self.ignore)
            ):
                out.append(Member(name, *matrix_shape(mod)))
        if not out:
            raise SpaceError(
                f"search space {self.name!r}: no layer of types {list(self.types)} matches targets {list(self.targets)}"
            )
        return out

    def build(self, model: nn.Module) -> list[Decision]:
        """Concrete decisions for ``model``: formats fitted, rules applied, ties grouped."""
        members = self.members(model)
        names = [m.name for m in members]
        for r in self.rules:
            if not any(matches(r.match, n) for n in names):
                raise SpaceError(f"rule {r.match!r} matches no decision tensor (e.g. {names[0]!r})")
        grid = self.candidate_formats()
        groups: dict[str, list[Member]] = {}
        allowed: dict[str, list[Format]] = {}
        unfit = [m for m in members if not any(f.fits(m.in_features) for f in grid if not f.is_full)]
        if unfit:  # nothing to quantize them with: they could only stay at 16 bits
            offered = sorted({f.key for f in grid if not f.is_full})
            what = (
                f"no format of {offered[:6]}{' ...' if len(offered) > 6 else ''} fits {len(unfit)} of its "
                f"{len(members)} "
                f"tensors (e.g. {unfit[0].name!r}, rows of {sorted({m.in_features for m in unfit})[:4]}): no group "
                "size divides "
                "those row widths"
            )
            if len(unfit) == len(members):
                raise SpaceError(f"search space {self.name!r} allows nothing: {what}; offer a group size that does")
            log.warning("search space %r: %s; they stay unquantized", self.name, what)
        for m in members:
            rules = [r for r in self.rules if matches(r.match, m.name)]
            if any(r.exclude for r in rules):
                continue
            pins = [r.pin for r in rules if r.pin is not None and r.pin not in grid]
            fmts = [f for f in grid + pins if f.fits(m.in_features) and all(r.allows(f) for r in rules)]
            if not fmts:
                raise SpaceError(f"{m.name}: no candidate format is left after the rules and group sizes")
            key = self._tie_key(m.name)
            groups.setdefault(key, []).append(m)
            allowed[m.name] = fmts
        decisions = []
        for key, ms in groups.items():
            common = [f for f in allowed[ms[0].name] if all(f in allowed[m.name] for m in ms[1:])]
            if not common:
                raise SpaceError(f"tied group {key!r} ({[m.name for m in ms]}): its members share no candidate format")
            decisions.append(Decision(key, tuple(ms), tuple(common)))
        return decisions

    def _tie_key(self, name: str) -> str:
        for t in self.tie:
            mt = fullmatch(t, name, "tie")
            if mt:
                return "tie:" + ".".join(g for g in mt.groups() if g is not None)
        return name
