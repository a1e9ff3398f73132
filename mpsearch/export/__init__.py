"""Exports: a plan out to the files other tools load. One registry; a new target is one file.

    from mpsearch.export import export
    export("plan.json", to="gguf", out="model.gguf", model="smollm2")

Each exporter is registered under ``("exporter", NAME)`` with :func:`exporter` and
documents the format it writes. It refuses a plan its target cannot express with an
:class:`ExportError` naming the tensor and the format, before it writes anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import registry
from ..plan import Plan


class ExportError(ValueError):
    """A plan (or a model) the target cannot express; the message names the tensor and format."""


@dataclass(frozen=True)
class Exporter:
    """``write(plan, out, model_spec, **options) -> Path`` writes the file and returns its path."""

    name: str
    write: Callable[..., Path]
    suffix: str
    about: str


def exporter(name: str, suffix: str, about: str):
    """Decorator: register ``write`` as the exporter ``name``."""
    def deco(write):
        registry.register("exporter", name)(Exporter(name, write, suffix, about))
        return write
    return deco


def get_exporter(name: str) -> Exporter:
    return registry.get("exporter", name)


def export(plan: Plan | str | Path, to: str, out: str | Path, model: str = "smollm2", **options) -> Path:
    """Write ``plan`` (a :class:`Plan` or a plan file) for target ``to`` to ``out``."""
    ex = get_exporter(to)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    return ex.write(plan, Path(out), model, **options)


from . import autoround_config, compressed_tensors_config, gguf_file, gptqmodel_config, tensor_types, torchao_config  # noqa: E402,F401  (register the exporters)

__all__ = ["ExportError", "Exporter", "export", "exporter", "get_exporter"]
