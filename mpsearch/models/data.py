"""Text for calibration and evaluation.

The default is Jane Austen's novels from Debian's ``r-cran-janeaustenr`` (no R needed:
``rdata`` reads its lazy-load database). Calibrate on some novels, evaluate on others.
A spec is ``austen:<novel>[+<novel>...]``, a path to a text file, or
``hf:<dataset>[:<config>]:<split>`` (needs the ``datasets`` package and the hub).
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..store.cache import cache_dir

NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
DEFAULT_CALIBRATION = "austen:prideprejudice"
DEFAULT_EVALUATION = "austen:persuasion"
DEB_PACKAGE = "r-cran-janeaustenr"
_RDATA = Path("usr/lib/R/site-library/janeaustenr/data")


class DataError(RuntimeError):
    """Text that cannot be found, read, or is too short for what was asked."""


@dataclass(frozen=True)
class TextData:
    name: str
    text: str


def load_text(spec: str) -> TextData:
    """Resolve a data spec (see module docstring) to text."""
    if spec.startswith("austen:"):
        novels = spec[len("austen:") :].split("+")
        return TextData(spec, "\n\n".join(austen_novel(n) for n in novels))
    if spec.startswith("hf:"):
        return _load_hf(spec)
    path = Path(spec)
    if path.is_file():
        return TextData(spec, path.read_text(encoding="utf-8", errors="replace"))
    raise DataError(
        f"data {spec!r} is neither 'austen:<novel>' ({', '.join(NOVELS)}), an existing text file, nor "
        "'hf:<dataset>:<split>'"
    )


def austen_novel(name: str) -> str:
    """One novel's text; lines of a paragraph joined, paragraphs separated by blank lines."""
    if name not in NOVELS:
        raise DataError(f"unknown novel {name!r}; choose from {', '.join(NOVELS)}")
    lines = _read_austen()[name]
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def austen_dir() -> Path:
    """The janeaustenr data folder: ``$MPSEARCH_AUSTEN_DIR``, the system package, or our cache (fetched from Debian
    once)."""
    return debian_data_dir("MPSEARCH_AUSTEN_DIR", DEB_PACKAGE, _RDATA, "Rdata.rdx")


def debian_data_dir(env: str, package: str, inside: Path, marker: str) -> Path:
    """Folder ``inside`` of a Debian data package: ``$env``, the installed package, or our
    cache (fetched with ``apt-get download`` once); the one holding ``marker`` wins."""
    candidates = [Path(os.environ[env])] if env in os.environ else []
    candidates += [Path("/") / inside, cache_dir() / "data" / package / inside]
    for c in candidates:
        if (c / marker).exists():
            return c
    from ..store.cache import cache_writable, scratch_dir

    return fetch_deb((cache_dir() if cache_writable() else scratch_dir()) / "data" / package, package) / inside


def fetch_deb(dest: Path, package: str = DEB_PACKAGE) -> Path:
    """``apt-get download`` + ``dpkg -x`` of a Debian data package (no root needed for either)."""
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise DataError(f"data not found and apt-get/dpkg are unavailable: install Debian's {package}")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise DataError(
                f"`apt-get download {package}` failed ({r.stderr.strip()[-300:]}); run `apt-get update` first"
            )
        try:
            _unpack(debs[0], dest)
        except (OSError, DataError) as e:  # a full or read-only cache: unpack into this process's scratch space
            from ..store.cache import NO_SPACE, NOT_WRITABLE, cache_dir, not_writable, scratch_dir

            if cache_dir() not in dest.parents or (isinstance(e, OSError) and e.errno not in NO_SPACE | NOT_WRITABLE):
                raise
            not_writable(cache_dir(), e if isinstance(e, OSError) else OSError(errno.ENOSPC, str(e)))
            dest = scratch_dir() / "data" / package
            _unpack(debs[0], dest)
    return dest


def _unpack(deb: Path, dest: Path) -> None:
    """``dpkg -x`` into a folder of its own, renamed to ``dest``: a copy is whole or absent."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.partial")  # per process: two searches may fetch at once
    shutil.rmtree(part, ignore_errors=True)
    r = subprocess.run(["dpkg", "-x", str(deb), str(part)], capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(part, ignore_errors=True)
        raise DataError(f"`dpkg -x {deb.name}` into {dest.parent} failed: {r.stderr.strip()[-200:]}")
    try:
        os.replace(part, dest)
    except OSError:  # another process put its copy there first; never remove a copy someone may be reading
        shutil.rmtree(part, ignore_errors=True)


def _read_austen() -> dict[str, list[str]]:
    """The novels; a corrupt copy in our own cache is removed and fetched again once
    (a system-wide or ``$MPSEARCH_AUSTEN_DIR`` copy is only reported: it is not ours)."""
    d = austen_dir()
    try:
        return _read_rdata(d)
    except DataError as e:
        ours = cache_dir() / "data" / DEB_PACKAGE
        if ours not in d.parents:
            raise
        from ..store.cache import discard

        discard(ours, str(e))
        return _read_rdata(austen_dir())


def _read_rdata(d: Path) -> dict[str, list[str]]:
    """Read R's lazy-load database (``Rdata.rdx`` index + zlib records in ``Rdata.rdb``)."""
    import warnings

    import rdata

    warnings.filterwarnings("ignore", message="Unknown file type", module="rdata")
    try:
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((d / "Rdata.rdx").read_bytes())))
        blob = (d / "Rdata.rdb").read_bytes()
        out = {}
        for name, (offset, length) in index["variables"].items():
            record = blob[int(offset) : int(offset) + int(length)]
            (size,) = struct.unpack(">I", record[:4])
            raw = zlib.decompress(record[4:])
            if len(raw) != size:
                raise DataError(f"{d}/Rdata.rdb: record {name} is {len(raw)} bytes, index says {size}")
            out[str(name)] = [
                str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))
            ]
        return out
    except (OSError, zlib.error, ValueError, KeyError, TypeError, EOFError, struct.error) as e:
        raise DataError(f"could not read the Jane Austen data in {d}: {e}") from None


def _load_hf(spec: str) -> TextData:
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3):
        raise DataError(f"{spec!r}: expected hf:<dataset>[:<config>]:<split>")
    try:
        import datasets
    except ImportError:
        raise DataError("hf: data needs `pip install datasets`") from None
    ds = datasets.load_dataset(parts[0], parts[1] if len(parts) == 3 else None, split=parts[-1])
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return TextData(spec, "\n\n".join(t for t in ds[column] if t))


def leading_tokens(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text (BOS for Llama-3, Gemma; none for SmolLM2).

    Read off the tokenizer itself: encode a short text with and without special tokens
    and keep what comes in front.
    """
    probe = "The text."
    plain = tokenizer(probe, add_special_tokens=False).input_ids
    full = tokenizer(probe, add_special_tokens=True).input_ids
    if len(full) > len(plain) and full[len(full) - len(plain) :] == plain:
        return list(full[: len(full) - len(plain)])
    if full[: len(plain)] == plain:  # only tokens after the text (EOS): none in front
        return []
    raise DataError(f"cannot tell which tokens {type(tokenizer).__name__} adds around text ({full} vs {plain})")


def text_tokens(windows: torch.Tensor, tokenizer, lead: bool = True) -> int:
    """How many text tokens ``windows`` (from :func:`token_chunks`) took from the start of the text."""
    return int(windows.numel() - windows.shape[0] * (len(leading_tokens(tokenizer)) if lead else 0))


#: which windows get the tokens the tokenizer puts in front (a diagnostic knob; "auto" is right)
BOS_CHOICES = ("auto", "none", "calibration", "evaluation")


def conventions(tokenizer, bos: str = "auto") -> dict:
    """How windows are built for this tokenizer; recorded in every plan's provenance."""
    lead = leading_tokens(tokenizer)
    return {
        "leading_tokens": lead,
        "bos": bool(lead) and lead[-1] == getattr(tokenizer, "bos_token_id", None),
        "calibration_leading": bos in ("auto", "calibration"),
        "evaluation_leading": bos in ("auto", "evaluation"),
    }


def token_chunks(
    tokenizer, data: TextData, seq_len: int, n_chunks: int, skip: int = 0, lead: bool = True
) -> torch.Tensor:
    """``[n_chunks, seq_len]`` windows the way the model saw text in training: the tokens
    the tokenizer puts in front (BOS, where it adds one; ``lead=False`` leaves them out),
    then consecutive, non-overlapping stretches of the text, from its start or after the
    first ``skip`` text tokens."""
    if seq_len < 2 or n_chunks < 1:
        raise DataError(f"need seq_len >= 2 and n_chunks >= 1, got {seq_len}, {n_chunks}")
    lead = leading_tokens(tokenizer) if lead else []
    body = seq_len - len(lead)
    if body < 1:
        raise DataError(f"seq_len {seq_len} leaves no room for text after the {len(lead)} leading token(s)")
    ids = tokenizer(data.text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    need = body * n_chunks + skip
    if ids.numel() < need:
        after = f" after the first {skip}" if skip else ""
        raise DataError(
            f"{data.name}: {ids.numel()} tokens, but {n_chunks} x {body} = {body * n_chunks}{after} were asked for"
        )
    text = ids[skip:need].reshape(n_chunks, body)
    if not lead:
        return text.clone()
    return torch.cat([torch.tensor(lead, dtype=ids.dtype).expand(n_chunks, -1), text], dim=1).contiguous()
