"""``--to gguf``: a GGUF file with the plan's per-tensor GGML types.

The file is the source model's GGUF with the planned tensors re-encoded: every metadata
key (architecture, hyper-parameters, tokenizer, chat template) and every tensor outside
the plan is copied unchanged, so a runtime sees the same model but for the planned
tensors. Each planned tensor is the source tensor, dequantized, quantized by
:mod:`mpsearch.quant.ggml` with the plan's importance vector (the imatrix), and stored
as GGML blocks (layout: ggml's ``block_q4_K`` etc., as ``gguf.quants`` reads them). Its
values are therefore exactly mpsearch's simulation of the plan; llama.cpp's row
permutation of q/k does not matter, since blocks run along rows. Unquantized (fp16)
entries are stored as F16 (``full_type="f32"`` keeps them exact).

The source must be a GGUF file (a packaged model or ``--model file.gguf``): for a
Hugging Face folder, convert it once with llama.cpp's ``convert_hf_to_gguf.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import torch

from ..core.files import write_atomic
from ..models import load_model
from ..quant.apply import check_plan
from ..quant.ggml import TYPES, pack
from .base import ExportError, exporter
from .names import arch_of, field, gguf_names, source_gguf

log = logging.getLogger(__name__)
#: metadata the writer sets itself, or that would misdescribe the new file
SKIP_KEYS = {"general.architecture", "general.file_type"}


@exporter("gguf", ".gguf", "a GGUF file with the planned GGML type per tensor (loads in llama.cpp and transformers)")
def write_gguf(plan, out: Path, model: str = "smollm2", check: bool = True, full_type: str = "f16") -> Path:
    if full_type not in ("f16", "f32"):
        raise ExportError(f"full_type must be f16 or f32, got {full_type!r}")
    src = source_gguf(model)
    if src is None:
        raise ExportError(
            f"GGUF export re-encodes the model's own GGUF file, and {model!r} is not one: give --model FILE.gguf "
            "(convert a Hugging Face folder once with llama.cpp's convert_hf_to_gguf.py)"
        )
    lm = load_model(model)
    resolved = check_plan(lm.model, plan, check)
    formats = resolved.weight_formats()
    for name, fmt in formats.items():  # every format must have a GGML type, before anything is written
        if not fmt.is_full and fmt.quantizer not in TYPES:
            raise ExportError(
                f"tensors[{name!r}].weight: format {fmt.key} has no GGML type "
                f"(GGUF types: {', '.join(sorted(TYPES))}); search with --space gguf"
            )
    names = gguf_names(*arch_of(model, lm.model), sorted(formats))
    planned = {g: m for m, g in names.items()}
    modules = dict(lm.model.named_modules())
    reader = gguf.GGUFReader(src)
    missing = sorted(set(planned) - {t.name for t in reader.tensors})
    if missing:
        raise ExportError(f"{src.name} has no tensor {missing[0]} (for {planned[missing[0]]})")

    arch = field(reader, "general.architecture")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        for f in reader.fields.values():
            if f.name.startswith("GGUF.") or f.name in SKIP_KEYS:
                continue
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
        writer.add_string("general.quantized_by", "mpsearch")
        for t in reader.tensors:
            if t.name not in planned:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
                continue
            module = planned[t.name]
            w = gguf.quants.dequantize(t.data, t.tensor_type)  # [out, in], llama.cpp's row order
            _same_rows(w, modules[module].weight, module, src.name)
            fmt = formats[module]
            if fmt.is_full:
                writer.add_tensor(t.name, w.astype(np.float16 if full_type == "f16" else np.float32))
            else:
                data = pack(torch.from_numpy(np.ascontiguousarray(w)), fmt, resolved.importance_for(module))
                writer.add_tensor(t.name, data, raw_dtype=TYPES[fmt.quantizer].qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomic(out, write)
    return out


def _same_rows(w: np.ndarray, weight: torch.Tensor, module: str, src: str) -> None:
    """The source tensor must be the model's weight up to a permutation of rows (llama.cpp
    permutes q/k); row sums compared as sorted multisets catch a wrong file."""
    if tuple(w.shape) != tuple(weight.shape):
        raise ExportError(f"{module}: {src} stores shape {tuple(w.shape)}, the model has {tuple(weight.shape)}")
    a = np.sort(w.astype(np.float64).sum(1))
    b = np.sort(weight.detach().double().sum(1).numpy())
    if not np.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise ExportError(
            f"{module}: {src} holds other values than the model's weight (not the file the model was loaded from?)"
        )
