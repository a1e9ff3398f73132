"""The files a user hands mpsearch, and the places it writes: read only what a file
should be, write only where asked.

- :func:`read_text` reads a plan, space or proxy file: a regular file (not a folder, a
  device such as ``/dev/zero``, or a FIFO that would block), at most a size cap, UTF-8.
  :func:`parse_json` / :func:`parse_toml` turn its text into data, refusing nesting deeper
  than :data:`MAX_DEPTH` (the parsers recurse, and so would every check after them).
- :func:`check_out_dir` / :func:`check_out_file` run before any work: an output folder is
  new, empty, or one mpsearch wrote before (it leaves :data:`MARKER` there); it is never a
  file, the filesystem root, or a place that cannot be written. :func:`prepare_out_dir`
  then makes the folder and leaves the marker.

Every error is a :class:`ValueError` subclass (the caller's own, e.g. ``PlanError``)
whose message names the path and the problem in one line.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

import tomllib

#: the repository's folders of built-in files (search spaces, proxies, hardware profiles)
SHIPPED = Path(__file__).resolve().parents[2]


def shipped(*parts: str) -> Path:
    """A built-in file or folder: ``shipped("search_spaces", "llama.toml")``."""
    return SHIPPED.joinpath(*parts)


#: size caps of the files users write by hand or mpsearch writes for them
PLAN_BYTES = 64 << 20
SPACE_BYTES = 1 << 20
PROXY_BYTES = 1 << 20
#: deepest nesting of objects / arrays a plan, space or proxy file may have (a plan needs 6)
MAX_DEPTH = 32
#: the file mpsearch leaves in every output folder, so a rerun may write there again
MARKER = ".mpsearch-output"
#: files that show a folder was written by an earlier mpsearch (from before the marker)
_EARLIER_OUTPUTS = ("results.csv", "trials.csv", "study.log", "kernels.csv", "mpsearch_plan.txt")


class OutputPathError(ValueError):
    """An output path that mpsearch must not, or cannot, write to."""


def _kind(mode: int) -> str:
    for test, word in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return word
    return "not a regular file"


def read_text(path: str | Path, what: str, limit: int, error: type[ValueError] = ValueError) -> str:
    """The UTF-8 text of the regular file ``path`` (a ``what``, e.g. "plan file"), at most ``limit`` bytes.

    Opened non-blocking and checked on the open descriptor, so a FIFO or a device is refused
    without a read, and a file swapped after a check is still the one checked.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise error(f"no {what} at {path}") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder, not a {what}") from None
    except OSError as e:
        raise error(f"cannot read the {what} {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path} is {_kind(st.st_mode)}, not a {what}: give a regular file")
        raise error(f"{path} is {st.st_size:,} bytes; a {what} is at most {limit:,}")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)  # it may have grown since fstat
    if len(data) > limit:
        raise error(f"{path} is over {limit:,} bytes; a {what} is at most {limit:,}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not a {what} (binary, not UTF-8 text)") from None


def check_depth(value: Any, where: str, error: type[ValueError] = ValueError, limit: int = MAX_DEPTH) -> Any:
    """``value`` itself, after checking that its dicts and lists nest at most ``limit`` deep (without recursion)."""
    todo = [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                raise error(f"{where} nests objects or arrays more than {limit} levels deep")
            todo.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return value


def parse_json(text: str, where: str, error: type[ValueError] = ValueError) -> Any:
    """JSON of at most :data:`MAX_DEPTH` levels; any other text is ``error`` naming ``where``."""
    return _parse(json.loads, json.JSONDecodeError, "{where}: not valid JSON: {e}", text, where, error)


def parse_toml(text: str, where: str, error: type[ValueError] = ValueError) -> dict:
    """TOML of at most :data:`MAX_DEPTH` levels; any other text is ``error`` naming ``where``."""
    return _parse(tomllib.loads, tomllib.TOMLDecodeError, "malformed TOML in {where}: {e}", text, where, error)


def _parse(loads, invalid: type[Exception], message: str, text: str, where: str, error: type[ValueError]) -> Any:
    try:
        value = loads(text)
    except invalid as e:
        raise error(message.format(where=where, e=e)) from None
    except RecursionError:  # both parsers recurse: far past MAX_DEPTH they run out of stack first
        raise error(f"{where} nests objects or arrays more than {MAX_DEPTH} levels deep") from None
    return check_depth(value, where, error)


# ------------------------------------------------------------------ writing
def atomic_path(path: Path) -> Path:
    """A new temporary file beside ``path`` (its folder made): write there, then ``os.replace`` it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary sibling of ``path``, then rename it: a reader, or a run killed
    half-way, never sees half a file. The one way mpsearch writes a file whole."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def write_csv_atomic(path: str | Path, df) -> Path:
    return write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy and torch scalars
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def safe_name(name: str) -> str:
    """A plan or proxy name as a file name: letters, digits and ``-_.@`` kept, anything else ``_``."""
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


# ------------------------------------------------------------------ output paths
def _writable(folder: Path, flag: str, path: Path) -> None:
    """A file can be made in ``folder`` (a real try: permissions, a read-only mount, a full disk)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mpsearch-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e})") from None


def _existing_ancestor(path: Path, flag: str) -> Path:
    """The nearest folder above ``path`` that exists (where its missing folders would be made)."""
    for up in path.absolute().parents:
        if up.exists():
            if not up.is_dir():
                raise OutputPathError(f"{flag} {path}: {up} is a file, not a folder")
            return up
    raise OutputPathError(f"{flag} {path}: none of its parent folders exists")


def written_by_mpsearch(folder: Path) -> bool:
    return any((folder / n).exists() for n in (MARKER, *_EARLIER_OUTPUTS))


def check_out_dir(path: str | Path, flag: str = "--out", marker: str = MARKER) -> Path:
    """An output folder, checked before any work: new, empty, or one mpsearch wrote (``marker`` in it)."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise OutputPathError(
                f"{flag} {p} is {'a broken link' if not p.exists() else 'a file'}, not a folder; "
                "give a new or empty folder"
            )
        real = p.resolve()
        if real == Path(real.anchor):
            raise OutputPathError(f"{flag} {p} is the filesystem root; give a new or empty folder")
        with os.scandir(real) as it:
            empty = next(it, None) is None
        ours = (real / marker).exists() if marker != MARKER else written_by_mpsearch(real)
        if not empty and not ours:
            raise OutputPathError(
                f"{flag} {p} is a folder with other files in it, not one mpsearch wrote "
                f"(it leaves {marker} in its output folders); give a new or empty folder"
            )
        _writable(real, flag, p)
    else:
        _writable(_existing_ancestor(p, flag), flag, p)
    return p


def prepare_out_dir(path: str | Path, marker: str = MARKER) -> Path:
    """Make a checked output folder and leave ``marker`` in it (a rerun may write there again)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / marker).touch()
    return p


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """An output file, checked before any work: not a folder or a device, in a folder that can be written."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{flag} {p} is a folder; give a file name (e.g. {p / 'out'}{p.suffix})")
    if p.exists() and not p.is_file():
        raise OutputPathError(f"{flag} {p} is {_kind(p.stat().st_mode)}, not a file to write")
    if p.is_symlink() and not p.exists():
        raise OutputPathError(f"{flag} {p} is a broken link")
    parent = p.absolute().parent
    _writable(parent if parent.is_dir() else _existing_ancestor(p, flag), flag, p)
    return p
