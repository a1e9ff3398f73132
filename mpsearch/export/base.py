"""What an exporter is, the decorator that registers one, and ``export``, which finds one by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core import registry
from ..core.plan import Plan


class ExportError(ValueError):
    """A plan (or a model) the target cannot express; the message names the tensor and format."""


@dataclass(frozen=True)
class Exporter:
    """``write(plan, out, model_spec, **options) -> Path`` writes the file and returns its path."""

    name: str
    write: Callable[..., Path]
    suffix: str
    about: str
    #: ``runtime_ok(target, fmt)``: the run-time formats (layer inputs, KV cache) the target writes; None: weights only
    runtime_ok: Callable | None = None


def exporter(name: str, suffix: str, about: str, runtime_ok: Callable | None = None):
    """Decorator: register ``write`` as the exporter ``name``."""

    def deco(write):
        registry.register("exporter", name)(Exporter(name, write, suffix, about, runtime_ok))
        return write

    return deco


def runtime_formats_for(plan: Plan, ex: Exporter, weights_only: bool = False) -> Plan:
    """The plan a target can write: run-time formats it cannot carry are refused, naming the tensor,
    or with ``weights_only`` dropped (each one logged)."""
    import logging

    log = logging.getLogger(__name__)
    ok = ex.runtime_ok or (lambda target, fmt: False)
    bad = [(n, t, f) for (n, t), f in sorted(plan.runtime_formats().items()) if not ok(t, f)]
    if not bad:
        return plan
    if not weights_only:
        n, t, f = bad[0]
        raise ExportError(
            f"tensors[{n!r}].{t}: {ex.name} cannot carry the run-time format {f.key} ({len(bad)} such entries); "
            "pass --weights-only to export the weights alone (the activation / KV formats are dropped)"
        )
    tensors = {n: dict(e) for n, e in plan.tensors.items()}
    for n, t, f in bad:
        log.warning("--weights-only: %s.%s %s dropped (%s writes weights only)", n, t, f.key, ex.name)
        tensors[n].pop(t)
    return Plan(
        plan.model_id,
        plan.model_fingerprint,
        tensors,
        dict(plan.budget),
        dict(plan.metrics),
        dict(plan.provenance),
        plan.importance,
        plan.calibration,
    )


def get_exporter(name: str) -> Exporter:
    return registry.get("exporter", name)


def export(plan: Plan | str | Path, to: str, out: str | Path, model: str = "smollm2", **options) -> Path:
    """Write ``plan`` (a :class:`Plan` or a plan file) for target ``to`` to ``out``. ``weights_only=True``
    drops run-time formats (inputs, KV cache) the target cannot carry instead of refusing the plan."""
    ex = get_exporter(to)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    plan = runtime_formats_for(plan, ex, options.pop("weights_only", False))
    return ex.write(plan, Path(out), model, **options)
