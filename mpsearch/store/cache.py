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

import atexit
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..core.files import atomic_path

log = logging.getLogger(__name__)

#: bump to orphan every entry written by an older layout
CACHE_FORMAT = "mpsearch-cache/2"


class CacheEntryError(ValueError):
    """An entry that fails a check; raised by schema checks, caught by the readers."""


def cache_dir() -> Path:
    """``$MPSEARCH_CACHE`` or ``~/.cache/mpsearch`` (made if missing and possible; see :func:`cache_writable`)."""
    d = Path(os.environ.get("MPSEARCH_CACHE", Path.home() / ".cache" / "mpsearch")).absolute()
    if not d.is_dir() and str(d) not in _UNWRITABLE:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            not_writable(d, e)
    return d


# ---------------------------------------------------------------- a cache that cannot be written
#: caches this process found it cannot write (read-only, no permission, full), with the reason
_UNWRITABLE: dict[str, str] = {}
_PROBED: set[str] = set()
#: errnos that mean "no room or no right to write here" rather than a bug
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def not_writable(root: Path, e: OSError) -> None:
    """Say once, in one line, that the cache ``root`` cannot be written; nothing more is written there."""
    if str(root) not in _UNWRITABLE:
        _UNWRITABLE[str(root)] = e.strerror or str(e)
        what = "full" if e.errno in NO_SPACE else "not writable"
        log.warning(
            "cache %s is %s (%s): this run reads what it holds and goes on without caching", root, what, e.strerror or e
        )


def cache_writable() -> bool:
    """Whether this process may write into the cache (a real try, once per cache folder)."""
    d = cache_dir()
    if str(d) not in _PROBED and str(d) not in _UNWRITABLE:
        _PROBED.add(str(d))
        try:
            fd, probe = tempfile.mkstemp(dir=d, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            not_writable(d, e)
    return str(d) not in _UNWRITABLE


def cache_write(path: Path, write: Callable[[Path], Any]) -> Path | None:
    """``write(tmp)`` into a temporary sibling of ``path`` in the cache, then rename: ``path``, or None
    when the cache cannot take it (read-only or full: said once, the temporary file removed). A path
    outside the cache (a scratch folder) is written the same way, and its errors are raised."""
    ours = cache_dir() in path.absolute().parents
    if ours and not cache_writable():
        return None
    tmp = None
    try:
        tmp = atomic_path(path)
        write(tmp)
        os.replace(tmp, path)
        return path
    except OSError as e:
        if not ours or e.errno not in NO_SPACE | NOT_WRITABLE:
            raise
        not_writable(cache_dir(), e)
        return None
    finally:
        if tmp is not None:
            remove(tmp)


def remove(path: Path) -> None:
    """Remove a file or folder if it is there and can be removed (a read-only cache keeps it)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


_SCRATCH: list[Path] = []


def scratch_dir() -> Path:
    """A folder in the system's temporary space for this process, removed when it exits: where a
    converted model or fetched data go when the cache cannot take them."""
    if not _SCRATCH:
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix="mpsearch-scratch-")))
        atexit.register(shutil.rmtree, _SCRATCH[0], ignore_errors=True)
    return _SCRATCH[0]


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


def _write_synced(data: bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return write


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def discard(path: Path, reason: str) -> None:
    """Log that the entry at ``path`` is unusable, and remove it (a file or a folder) where the cache allows."""
    log.warning("cache entry %s is unusable (%s); removed, recomputing", path, reason)
    remove(path)


# ---------------------------------------------------------------- checksummed entries
def write_entry(path: Path, body: bytes, key: str, schema: str) -> Path | None:
    """One header line (schema, key, SHA-256 and length of the body), then the body (None: the cache cannot take it)."""
    header = {"format": CACHE_FORMAT, "schema": schema, "key": key, "sha256": sha256(body), "bytes": len(body)}
    return cache_write(path, _write_synced(json.dumps(header).encode() + b"\n" + body))


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
            raise CacheEntryError(
                f"checksum mismatch ({len(body)} bytes, header says {header.get('bytes')}): truncated or altered"
            )
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
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float, np.integer, np.floating))
            or not math.isfinite(float(v))
        ):
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


def files_digest(folder: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (by path relative to it), but those in ``skip``."""
    skip = set(skip)
    return {
        str(p.relative_to(folder)): sha256(p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and str(p.relative_to(folder)) not in skip
    }


def check_files(folder: Path, recorded: str | None, skip: Iterable[str] = ()) -> None:
    """Raise :class:`CacheEntryError` naming the first file under ``folder`` that differs from the
    digests ``recorded`` (JSON of :func:`files_digest`): edited, added or removed."""
    if recorded is None:
        raise CacheEntryError("it records no checksums of its other files")
    want, have = json.loads(recorded), files_digest(folder, skip)
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            what = "missing" if name not in have else "not written by mpsearch" if name not in want else "altered"
            raise CacheEntryError(f"{name} is {what} since it was cached")


def read_tensors_metadata(path: Path, key: str) -> dict[str, str]:
    """The metadata of a safetensors entry written for ``key`` (:class:`CacheEntryError` otherwise)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for truncated or garbled files
        raise CacheEntryError(f"{type(e).__name__}: {e}") from None
    _check_metadata(meta, key)
    return meta


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
                    raise CacheEntryError(
                        f"{name} has shape {tuple(t.shape)}, the model's is {tuple(into[name].shape)}"
                    )
                into[name].copy_(t)
    except CacheEntryError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for truncated or garbled files
        raise CacheEntryError(f"{type(e).__name__}: {e}") from None
    if meta.get("sha256") != h.hexdigest():
        raise CacheEntryError("checksum mismatch: altered")
    return set(names)


def save_tensors(path: Path, state: dict, key: str, metadata: dict[str, str] | None = None) -> Path | None:
    """safetensors with the key and a digest of every tensor in its metadata, written atomically
    (None: the cache cannot take it)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:  # the digest is computed only when there is somewhere to write
        meta = {**(metadata or {}), "format": CACHE_FORMAT, "key": key, "sha256": tensors_digest(state)}
        try:
            save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=meta)
        except SafetensorError as e:  # its I/O errors come as text: "I/O error: No space left on device (os error 28)"
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(tmp)) from None

    return cache_write(path, write)


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
