"""One registry for every pluggable piece: quantizers, solvers, primitive families, cost models,
exporters and kernels.

A new component is one file with ``@register("solver", "milp")`` on its class, in the package
of its kind (:data:`PACKAGES`). The first lookup of a kind imports every module of that package,
so no package face imports its plugins (and no plugin imports a face back). A lookup miss lists
the names that are known, so a typo is never a silent fallback.
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
import warnings
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_REGISTRY: dict[str, dict[str, Any]] = {}
#: the package whose modules define each kind's built-in components
PACKAGES = {
    "quantizer": "mpsearch.quant",
    "solver": "mpsearch.solvers",
    "primitive family": "mpsearch.primitives",
    "cost": "mpsearch.cost",
    "exporter": "mpsearch.export",
    "kernel": "mpsearch.kernels",
}
_LOADED: set[str] = set()


def _load(kind: str) -> None:
    """Import every module of ``kind``'s package once, so each registers what it defines."""
    if kind in _LOADED or kind not in PACKAGES:
        return
    _LOADED.add(kind)  # first: a module that looks the kind up while it is imported must not start this again
    package = importlib.import_module(PACKAGES[kind])
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


class UnknownComponentError(KeyError):
    """Raised when a name is not registered under a kind."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register(kind: str, name: str) -> Callable[[T], T]:
    """Decorator: record ``obj`` under ``(kind, name)``; warns on overwrite."""

    def deco(obj: T) -> T:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not obj:
            warnings.warn(f"{kind} {name!r} registered twice; the later one wins", stacklevel=2)
        table[name] = obj
        return obj

    return deco


def get(kind: str, name: str) -> Any:
    """Look ``name`` up under ``kind``; the error lists the known names."""
    _load(kind)
    table = _REGISTRY.get(kind, {})
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise UnknownComponentError(f"unknown {kind} {name!r}; known {kind}s: {known}")
    return table[name]


def names(kind: str, pattern: str = "*") -> list[str]:
    """Sorted registered names of ``kind`` matching an fnmatch ``pattern``."""
    _load(kind)
    return sorted(n for n in _REGISTRY.get(kind, {}) if fnmatch.fnmatch(n, pattern))
