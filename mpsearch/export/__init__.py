"""Exports: a plan out to the files other tools load. One registry; a new target is one file.

    from mpsearch.export import export
    export("plan.json", to="gguf", out="model.gguf", model="smollm2")

Each exporter is registered under ``("exporter", NAME)`` with :func:`exporter` and
documents the format it writes. It refuses a plan its target cannot express with an
:class:`ExportError` naming the tensor and the format, before it writes anything.
"""

from .base import Exporter, ExportError, export, exporter, get_exporter

__all__ = ["ExportError", "Exporter", "export", "exporter", "get_exporter"]
