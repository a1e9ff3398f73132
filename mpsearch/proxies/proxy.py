"""Proxies: named expressions over per-(tensor, format) primitives, stored as TOML."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from mpsearch.core.files import PROXY_BYTES, parse_toml, read_text, shipped
from mpsearch.primitives import primitive_names
from mpsearch.proxies.expr import Expression, ExpressionError, parse

#: per (tensor, format) values every table provides, plus every primitive family's names;
#: ``oerr`` = trace(dW gram dW^T), the layer's output error, reads the ``gram`` primitive
FORMAT_NAMES: frozenset[str] = frozenset({"w", "dw", "numel", "bits", "qerr", "oerr", "kl"})
PRIMITIVE_NAMES: frozenset[str] = FORMAT_NAMES | primitive_names()

#: what a proxy may be called: it names result columns (``predicted_<name>``) and files
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_REQUIRED = ("name", "expression")
_OPTIONAL = ("description",)


class ProxyFileError(ValueError):
    """A proxy file (or built-in name) that cannot be loaded."""


@dataclass(frozen=True)
class Proxy:
    """A named loss-increase predictor for quantizing one tensor with one format."""

    name: str
    expression: Expression
    description: str = ""

    @property
    def needs(self) -> frozenset[str]:
        """The primitive names the expression reads (``oerr`` reads ``gram``)."""
        names = self.expression.names
        return names | {"gram"} if "oerr" in names else names

    def evaluate(self, env: Mapping[str, torch.Tensor | float]) -> float:
        """Shorthand for ``self.expression.evaluate(env)``."""
        return self.expression.evaluate(env)

    @classmethod
    def from_string(cls, name: str, text: str, description: str = "") -> Proxy:
        """Parse ``text`` over :data:`PRIMITIVE_NAMES`."""
        return cls(name, parse(text, PRIMITIVE_NAMES), description)

    @classmethod
    def from_file(cls, path: str | Path, names: frozenset[str] = PRIMITIVE_NAMES) -> Proxy:
        """Load a TOML file with keys ``name``, ``expression`` (over ``names``) and optional ``description``."""
        path = Path(path)
        data = parse_toml(
            read_text(path, "proxy file", PROXY_BYTES, ProxyFileError), f"proxy file {str(path)!r}", ProxyFileError
        )
        for key in data:
            if key not in _REQUIRED + _OPTIONAL:
                raise ProxyFileError(
                    f"unknown key {key!r} in proxy file {str(path)!r} (allowed: {', '.join(_REQUIRED + _OPTIONAL)})"
                )
        for key in _REQUIRED:
            if key not in data:
                raise ProxyFileError(f"missing key {key!r} in proxy file {str(path)!r}")
        for key, value in data.items():
            if not isinstance(value, str):
                raise ProxyFileError(
                    f"key {key!r} in proxy file {str(path)!r} must be a string, got {type(value).__name__}"
                )
        if not NAME.fullmatch(data["name"]):
            raise ProxyFileError(
                f"name {data['name'][:80]!r} in proxy file {str(path)!r} is not a proxy name: 1-64 letters, "
                "digits, '_', '-' or '.', starting with a letter or '_' (it names result columns and files)"
            )
        try:
            expression = parse(data["expression"], names)
        except ExpressionError as err:
            raise ProxyFileError(f"bad expression in proxy file {str(path)!r}: {err}") from err
        return cls(data["name"], expression, data.get("description", ""))


def builtin_dir() -> Path:
    """The repository's top-level ``proxies/`` folder of built-in proxy files."""
    return shipped("proxies")


def list_proxies() -> list[str]:
    """Sorted names (file stems) of the built-in proxies."""
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


def load_proxy(spec: str) -> Proxy:
    """Load ``spec`` as a path to a TOML file, else as the name of a built-in proxy."""
    path = Path(spec)
    if os.path.lexists(path):  # whatever is there (a folder, a FIFO) gets from_file's error, not "no such proxy"
        return Proxy.from_file(path)
    builtin = builtin_dir() / f"{spec}.toml"
    if builtin.is_file():
        return Proxy.from_file(builtin)
    known = ", ".join(list_proxies()) or "none"
    raise ProxyFileError(f"no proxy file or built-in proxy {spec!r}; built-in proxies: {known}")
