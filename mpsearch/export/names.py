"""Where a plan's tensors live in GGUF: the source file and llama.cpp's tensor names."""

from __future__ import annotations

from pathlib import Path

import gguf
from torch import nn

from ..models.loader import PACKAGED


def source_gguf(spec: str) -> Path | None:
    """The GGUF file behind a model spec (a packaged name or a ``.gguf`` path), else None."""
    if spec in PACKAGED:
        return PACKAGED[spec][1]()
    if str(spec).lower().endswith(".gguf"):
        return Path(spec)
    return None


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def arch_of(spec: str, model: nn.Module) -> tuple[gguf.MODEL_ARCH, int]:
    """llama.cpp's architecture and block count: from the source GGUF, else from the HF config."""
    from .base import ExportError

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    src = source_gguf(spec)
    if src is not None:
        reader = gguf.GGUFReader(src)
        name = field(reader, "general.architecture")
        blocks = field(reader, f"{name}.block_count")
    else:
        cfg = model.config
        name, blocks = cfg.model_type, cfg.num_hidden_layers
    if name not in by_name:
        raise ExportError(f"llama.cpp has no architecture {name!r}; known: {', '.join(sorted(by_name))}")
    return by_name[name], int(blocks)


def gguf_names(arch: gguf.MODEL_ARCH, blocks: int, modules: list[str]) -> dict[str, str]:
    """Module name -> GGUF tensor name of its weight (``model.layers.0.self_attn.q_proj`` ->
    ``blk.0.attn_q.weight``); an error names a module llama.cpp has no tensor for."""
    from .base import ExportError

    table = gguf.get_tensor_name_map(arch, blocks)
    out = {}
    for m in modules:
        name = table.get_name(f"{m}.weight", try_suffixes=(".weight",))
        if name is None:
            raise ExportError(f"{m}: llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} has no tensor for this module")
        out[m] = name
    return out
