"""The one cache layer every stage uses: converted models, primitives, measured KL,
proxy tables and plan evaluations.

Three rules make a cache tell the truth:

- **Content-addressed keys.** :func:`content_key` hashes everything a value depends on
  (weights, token values *and* shape and dtype, settings, quantizer versions); the key
  names the file, so other inputs can never find it.
- **Atomic writes.** Everything is written to a temporary sibling and renamed, so an
  interrupted run never leaves a half-written entry under a real name.
- **Checked reads.** Every entry carries a header with its schema, its key and a
  SHA-256 of its body (safetensors files: in their metadata). A read that fails any
  check, or the caller's schema check, logs the path and the reason, removes the entry
  and returns ``None``: the caller recomputes. Nothing corrupt is ever served, and no
  NaN reaches a result: callers' checks reject non-finite values.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)

#: bump to orphan every entry written by an older layout
CACHE_FORMAT = "mpsearch-cache/2"


class CacheEntryError(ValueError):
    """An entry that fails a check; raised by schema checks, caught by the readers."""


def cache_dir() -> Path:
    """``$MPSEARCH_CACHE`` or ``~/.cache/mpsearch``."""
    d = Path(os.environ.get("MPSEARCH_CACHE", Path.home() / ".cache" / "mpsearch"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def content_key(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (and of the cache layout's version)."""
    blob = json.dumps([CACHE_FORMAT, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def tokens_hash(tokens) -> str:
    """Hash of token values *and* their shape and dtype: 4 x 128 and 2 x 256 of the same
    tokens are different calibration sets (other sequences, other statistics). Batches
    (:mod:`mpsearch.models.batches`) give their own digest."""
    if hasattr(tokens, "digest"):
        return tokens.digest()
    h = hashlib.sha256(f"{tuple(tokens.shape)}|{tokens.dtype};".encode())
    h.update(tokens.contiguous().cpu().numpy().tobytes())  # the same bytes, wherever the tensor lives
    return h.hexdigest()[:20]


def atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path``; write there, then ``os.replace(tmp, path)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    tmp = atomic_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def discard(path: Path, reason: str) -> None:
    """Log that the entry at ``path`` is unusable, and remove it (a file or a folder)."""
    log.warning("cache entry %s is unusable (%s); removed, recomputing", path, reason)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- checksummed entries
def write_entry(path: Path, body: bytes, key: str, schema: str) -> Path:
    """One header line (schema, key, SHA-256 and length of the body), then the body."""
    header = {"format": CACHE_FORMAT, "schema": schema, "key": key, "sha256": sha256(body), "bytes": len(body)}
    return atomic_write_bytes(path, json.dumps(header).encode() + b"\n" + body)


def read_entry(path: Path, key: str, schema: str) -> bytes | None:
    """The body of a valid entry, or ``None`` (missing; or corrupt, then logged and removed)."""
    if not path.exists():
        return None
    try:
        raw = path.read_bytes()
        head, sep, body = raw.partition(b"\n")
        if not sep:
            raise CacheEntryError("no header line")
        try:
            header = json.loads(head)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CacheEntryError("unreadable header") from None
        if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT:
            raise CacheEntryError(f"not a {CACHE_FORMAT} entry")
        if header.get("schema") != schema or header.get("key") != key:
            raise CacheEntryError(f"written for {header.get('schema')}/{header.get('key')}, expected {schema}/{key}")
        if header.get("bytes") != len(body) or header.get("sha256") != sha256(body):
            raise CacheEntryError(f"checksum mismatch ({len(body)} bytes, header says {header.get('bytes')}): truncated or altered")
    except (OSError, CacheEntryError) as e:
        discard(path, str(e))
        return None
    return body


def write_json(path: Path, value: Any, key: str, schema: str) -> Path:
    return write_entry(path, json.dumps(value, sort_keys=True, allow_nan=False).encode(), key, schema)


def read_json(path: Path, key: str, schema: str, check: Callable[[Any], None] | None = None) -> Any | None:
    """A JSON entry that passes its checksum and ``check`` (which raises :class:`CacheEntryError`)."""
    body = read_entry(path, key, schema)
    if body is None:
        return None
    try:
        value = json.loads(body)
        if check is not None:
            check(value)
    except (ValueError, TypeError, KeyError) as e:  # CacheEntryError and json errors are ValueErrors
        discard(path, str(e))
        return None
    return value


def write_frame(path: Path, df, key: str, schema: str) -> Path:
    """A pandas table as CSV (floats written exactly) under a checksummed header."""
    return write_entry(path, df.to_csv(index=False, float_format="%.17g").encode(), key, schema)


def read_frame(path: Path, key: str, schema: str, check: Callable[[Any], None] | None = None):
    import pandas as pd

    body = read_entry(path, key, schema)
    if body is None:
        return None
    try:
        df = pd.read_csv(io.BytesIO(body))
        if check is not None:
            check(df)
    except (ValueError, TypeError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        discard(path, str(e))
        return None
    return df


# ---------------------------------------------------------------- schema helpers
def require_finite(values: Iterable[float], what: str) -> None:
    """Raise :class:`CacheEntryError` on the first value that is not a finite number."""
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(float(v)):
            raise CacheEntryError(f"{what} holds {v!r}, not a finite number")


def require(cond: bool, message: str) -> None:
    if not cond:
        raise CacheEntryError(message)


# ---------------------------------------------------------------- safetensors entries
def tensors_digest(state: dict) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        _digest_update(h, name, state[name])
    return h.hexdigest()


def _digest_update(h, name: str, t) -> None:
    import torch

    t = t.detach().contiguous().cpu()  # a CUDA tensor hashes as its CPU copy
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def _check_metadata(meta: dict, key: str) -> None:
    if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
        raise CacheEntryError(f"written for key {meta.get('key')}, expected {key}")


def load_tensors_into(path: Path, key: str, into: dict) -> set[str]:
    """Copy a checked safetensors entry tensor by tensor into the tensors of ``into`` (e.g. a
    model's ``state_dict()``), so a model is never held twice; returns the names loaded.

    Raises :class:`CacheEntryError` (the caller discards the entry) on a wrong key, a name
    ``into`` lacks, a shape mismatch, a bad checksum, or a file safetensors cannot read.
    """
    from safetensors import safe_open

    h = hashlib.sha256()
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            _check_metadata(meta, key)
            names = sorted(f.keys())
            for name in names:
                t = f.get_tensor(name)
                _digest_update(h, name, t)
                if name not in into:
                    raise CacheEntryError(f"holds {name!r}, which the model does not have")
                if into[name].shape != t.shape:
                    raise CacheEntryError(f"{name} has shape {tuple(t.shape)}, the model's is {tuple(into[name].shape)}")
                into[name].copy_(t)
    except CacheEntryError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for truncated or garbled files
        raise CacheEntryError(f"{type(e).__name__}: {e}") from None
    if meta.get("sha256") != h.hexdigest():
        raise CacheEntryError("checksum mismatch: altered")
    return set(names)


def save_tensors(path: Path, state: dict, key: str, metadata: dict[str, str] | None = None) -> Path:
    """safetensors with the key and a digest of every tensor in its metadata, written atomically."""
    from safetensors.torch import save_file

    tmp = atomic_path(path)
    meta = {**(metadata or {}), "format": CACHE_FORMAT, "key": key, "sha256": tensors_digest(state)}
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_tensors(path: Path, key: str) -> dict | None:
    """The tensors of a valid entry, or ``None`` (missing; or corrupt, then logged and removed)."""
    got = load_tensors_and_metadata(path, key)
    return None if got is None else got[0]


def load_tensors_and_metadata(path: Path, key: str) -> tuple[dict, dict[str, str]] | None:
    """:func:`load_tensors`, with the metadata the entry was saved with."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        _check_metadata(meta, key)
        if meta.get("sha256") != tensors_digest(state):
            raise CacheEntryError("checksum mismatch: altered")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for truncated or garbled files
        discard(path, f"{type(e).__name__}: {e}")
        return None
    return state, meta
