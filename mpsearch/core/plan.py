"""The plan: the one artifact every stage exchanges (``mpsearch.core.plan/v1``).

A plan maps tensor names to a format per target (``weight`` today; ``input``,
``k_cache`` and ``v_cache`` are reserved for activation and KV formats). Entries may
be exact names or ``re:`` patterns, plus ``_default``; precedence is
exact name > first matching ``re:`` pattern (in file order) > ``_default``.
:meth:`Plan.resolve` expands patterns to exact names, and a saved plan is always
explicit. The model fingerprint is checked before a plan touches a model.

Formats whose quantizer weights its scale search by an importance vector (GGUF types,
like llama.cpp with an imatrix) give values that depend on calibration data. Such a
plan carries its ``importance`` (per tensor, the layer input's mean square per column);
:meth:`Plan.save` writes it beside the JSON as ``NAME.importance.safetensors`` and
records the file and its SHA-256, so applying or exporting the plan later reproduces
exactly the values that were measured.

Run-time targets (``input``, ``k_cache``, ``v_cache``) whose formats are calibrated
offline (a static activation scale, KVQuant's key ranges and codebooks) carry those
tensors the same way: ``calibration``, written as ``NAME.calibration.safetensors``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .files import PLAN_BYTES, parse_json, read_text, write_atomic, write_json_atomic
from .format import Format, FormatError
from .patterns import PatternError, compile_pattern, fullmatch

FORMAT_ID = "mpsearch.core.plan/v1"
TARGETS = ("weight", "input", "k_cache", "v_cache")
TOP_KEYS = {"format", "model", "tensors", "budget", "metrics", "provenance", "importance", "calibration"}


def importance_digest(importance: Mapping[str, torch.Tensor] | None) -> str:
    """SHA-256 of importance vectors (names, shapes, float32 values); "" for none."""
    if not importance:
        return ""
    h = hashlib.sha256()
    for name in sorted(importance):
        t = importance[name].detach().to(torch.float32).contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class PlanError(ValueError):
    """A plan that is malformed, or that does not fit the model it is given."""


def fingerprint(model: nn.Module) -> str:
    """Hash of every parameter's name and shape: a plan is never applied to the wrong model."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return "sha256:" + h.hexdigest()[:32]


@dataclass
class Plan:
    """A mixed-precision plan. ``tensors[name][target] -> Format`` (``None`` = keep as is)."""

    model_id: str
    model_fingerprint: str
    tensors: dict[str, dict[str, Format | None]]
    budget: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    #: per-tensor importance (``[in_features]``) for quantizers that weight their scale search
    importance: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    #: calibrated tensors of run-time formats, keyed ``module/target/format/name`` (:mod:`mpsearch.quant.hooks`)
    calibration: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    #: costs read off this machine's clocks (measured kernels, the roofline of its measured peaks): they differ from
    #: run to run, so results.csv carries them and the plan file does not (same inputs, same file)
    timings: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------ precedence
    def resolve(self, names: Iterable[str], pattern_names: Iterable[str] | None = None) -> "Plan":
        """Expand ``re:`` patterns and ``_default``; unknown exact names raise.

        Exact names may address any of ``names``; patterns and ``_default`` reach only
        ``pattern_names`` (the search space's decision tensors; all of ``names`` when
        ``None``), so ``{"_default": ...}`` never quantizes an embedding or LM head by accident.
        """
        names = list(names)
        known = set(names)
        exact = {k: v for k, v in self.tensors.items() if not k.startswith("re:") and k != "_default"}
        unknown = sorted(set(exact) - known)
        if unknown:
            raise PlanError(
                f"plan names tensor(s) the model does not have: {unknown[:5]}" + (" ..." if len(unknown) > 5 else "")
            )
        patterns = [(k, v) for k, v in self.tensors.items() if k.startswith("re:")]
        default = self.tensors.get("_default")
        out: dict[str, dict[str, Format | None]] = {}
        scope = set(names if pattern_names is None else pattern_names)

        def hit(k: str, n: str) -> bool:
            try:
                return bool(fullmatch(k, n, f"tensors[{k!r}]"))
            except PatternError as e:
                raise PlanError(str(e)) from None

        unmatched = [k for k, _ in patterns if not any(hit(k, n) for n in scope)]
        if unmatched:
            where = "tensor of the model" if pattern_names is None else "decision tensor of the search space"
            raise PlanError(f"plan pattern(s) match no {where}: {unmatched}")
        for n in names:
            if n in exact:
                entry = exact[n]
            elif n in scope:
                entry = next((e for k, e in patterns if hit(k, n)), default)
            else:
                entry = None
            if entry is not None:
                out[n] = dict(entry)
        return Plan(
            self.model_id,
            self.model_fingerprint,
            out,
            dict(self.budget),
            dict(self.metrics),
            dict(self.provenance),
            self.importance,
            self.calibration,
        )

    def importance_for(self, name: str) -> torch.Tensor | None:
        return None if self.importance is None else self.importance.get(name)

    def weight_formats(self) -> dict[str, Format]:
        """Exact tensor name -> weight format, for quantized weights only."""
        return {n: t["weight"] for n, t in self.tensors.items() if t.get("weight") is not None}

    def runtime_formats(self) -> dict[tuple[str, str], Format]:
        """``(tensor, target) -> format`` for the quantized run-time targets (inputs, KV cache)."""
        return {
            (n, t): f
            for n, e in self.tensors.items()
            for t, f in e.items()
            if t != "weight" and f is not None and not f.is_full
        }

    # -------------------------------------------------------------- checking
    def check_model(self, model: nn.Module) -> None:
        """Raise if the plan was made for a different model."""
        fp = fingerprint(model)
        if self.model_fingerprint != fp:
            raise PlanError(
                f"plan was made for model {self.model_id!r} with fingerprint {self.model_fingerprint}, "
                f"but this model's fingerprint is {fp}: wrong model (parameter names or shapes differ)"
            )

    # --------------------------------------------------------------- (de)ser
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_ID,
            "model": {"id": self.model_id, "fingerprint": self.model_fingerprint},
            "tensors": {
                n: {t: (f.to_dict() if f is not None else None) for t, f in e.items()} for n, e in self.tensors.items()
            },
            "budget": self.budget,
            "metrics": dict(sorted(self.metrics.items())),  # one byte order, whichever stage measured what first
            "provenance": self.provenance,
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Plan":
        """Validate and build; every error names the offending key."""
        if not isinstance(d, Mapping):
            raise PlanError(f"plan must be a JSON object, got {type(d).__name__}")
        extra = set(d) - TOP_KEYS
        if extra:
            raise PlanError(f"unknown top-level key(s) {sorted(extra)}; allowed: {sorted(TOP_KEYS)}")
        for k in ("format", "model", "tensors"):
            if k not in d:
                raise PlanError(f"missing key {k!r}")
        if d["format"] != FORMAT_ID:
            raise PlanError(f"format: expected {FORMAT_ID!r}, got {d['format']!r}")
        m = d["model"]
        if not isinstance(m, Mapping) or not isinstance(m.get("id"), str) or not isinstance(m.get("fingerprint"), str):
            raise PlanError("model: expected an object with string keys 'id' and 'fingerprint'")
        if not isinstance(d["tensors"], Mapping):
            raise PlanError("tensors: expected an object mapping tensor names to targets")
        tensors: dict[str, dict[str, Format | None]] = {}
        for name, entry in d["tensors"].items():
            try:
                compile_pattern(name, "tensors")
            except PatternError as e:
                raise PlanError(str(e)) from None
            where = f"tensors[{name!r}]"
            if not isinstance(entry, Mapping):
                raise PlanError(f"{where}: expected an object of targets {list(TARGETS)}")
            bad = set(entry) - set(TARGETS)
            if bad:
                raise PlanError(f"{where}: unknown target(s) {sorted(bad)}; allowed: {list(TARGETS)}")
            try:
                tensors[name] = {
                    t: (Format.from_dict(f, f"{where}.{t}") if f is not None else None) for t, f in entry.items()
                }
            except FormatError as e:
                raise PlanError(str(e)) from None
        for k in ("budget", "metrics", "provenance"):
            if not isinstance(d.get(k, {}), Mapping):
                raise PlanError(f"{k}: expected an object")
        return Plan(
            m["id"],
            m["fingerprint"],
            tensors,
            dict(d.get("budget", {})),
            dict(d.get("metrics", {})),
            dict(d.get("provenance", {})),
        )

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (patterns must be resolved first: saved plans are explicit);
        importance vectors go beside it (``NAME.importance.safetensors``)."""
        if any(k.startswith("re:") or k == "_default" for k in self.tensors):
            raise PlanError("resolve the plan against the model before saving: saved plans name every tensor")
        d = self.to_dict()
        for what in ("importance", "calibration"):
            tensors = getattr(self, what)
            if tensors:
                d[what] = _save_sidecar(Path(path), what, tensors)
        return write_json_atomic(path, d)

    @staticmethod
    def load(path: str | Path) -> "Plan":
        path = Path(path)
        d = parse_json(read_text(path, "plan file", PLAN_BYTES, PlanError), str(path), PlanError)
        try:
            plan = Plan.from_dict(d)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None
        if isinstance(d, dict) and d.get("importance"):
            plan.importance = _load_sidecar(path, "importance", d["importance"])
        if isinstance(d, dict) and d.get("calibration"):
            plan.calibration = _load_sidecar(path, "calibration", d["calibration"])
        return plan


_HOLDS = {
    "importance": "the imatrix its GGUF formats were quantized with",
    "calibration": "the calibrated scales and codebooks of its activation / KV formats",
}


def _save_sidecar(path: Path, what: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Write ``NAME.<what>.safetensors`` beside the plan; returns the reference the JSON records."""
    from safetensors.torch import save_file

    side = path.with_name(f"{path.stem}.{what}.safetensors")
    write_atomic(
        side,
        lambda tmp: save_file(
            {k: v.detach().to(torch.float32).contiguous().cpu().clone() for k, v in tensors.items()}, str(tmp)
        ),
    )  # clone: entries may share storage
    return {"file": side.name, "sha256": importance_digest(tensors)}


def _load_sidecar(path: Path, what: str, ref: Any) -> dict[str, torch.Tensor]:
    """The ``what`` file a saved plan names, checked against its recorded SHA-256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (
        not isinstance(ref, Mapping)
        or not isinstance(ref.get("file"), str)
        or not isinstance(ref.get("sha256"), str)
        or not Path(ref["file"]).name
    ):
        raise PlanError(f"{path}: {what}: expected an object with string keys 'file' (a file name) and 'sha256'")
    side = path.with_name(Path(ref["file"]).name)
    try:
        if not stat.S_ISREG(os.stat(side).st_mode):  # a FIFO or a device would block or never end
            raise PlanError(f"{path}: its {what} file {side.name} is not a regular file")
        tensors = load_file(str(side))
    except FileNotFoundError:
        raise PlanError(f"{path}: its {what} file {side.name} is missing (it holds {_HOLDS[what]})") from None
    except (SafetensorError, OSError) as e:
        raise PlanError(f"{path}: its {what} file {side.name} cannot be read: {e}") from None
    if importance_digest(tensors) != ref["sha256"]:
        raise PlanError(f"{path}: its {what} file {side.name} does not match the SHA-256 the plan records")
    return tensors
