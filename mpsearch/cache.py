"""Where mpsearch keeps what it computed once: converted models, data, primitives.

Everything is keyed by content (model fingerprint, data hash, settings) and written
atomically, so an interrupted run never leaves a corrupt entry and a rerun resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """``$MPSEARCH_CACHE`` or ``~/.cache/mpsearch``."""
    d = Path(os.environ.get("MPSEARCH_CACHE", Path.home() / ".cache" / "mpsearch"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def content_key(*parts: Any) -> str:
    """Short stable hash of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path``; write there, then ``os.replace(tmp, path)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
