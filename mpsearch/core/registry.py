"""One registry for every pluggable piece: quantizers, proxies, solvers, exporters.

A new component is one file with ``@register("solver", "milp")`` on its class; a
lookup miss lists the names that are known, so a typo is never a silent fallback.
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_REGISTRY: dict[str, dict[str, Any]] = {}


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
    table = _REGISTRY.get(kind, {})
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise UnknownComponentError(f"unknown {kind} {name!r}; known {kind}s: {known}")
    return table[name]


def names(kind: str, pattern: str = "*") -> list[str]:
    """Sorted registered names of ``kind`` matching an fnmatch ``pattern``."""
    return sorted(n for n in _REGISTRY.get(kind, {}) if fnmatch.fnmatch(n, pattern))
