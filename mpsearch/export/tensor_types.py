"""``--to llama.cpp-tensor-types``: the override file ``llama-quantize --tensor-type-file`` reads.

One line per planned tensor, ``^blk\\.0\\.attn_q\\.weight$=Q4_K``: an anchored, escaped
regex over llama.cpp's tensor name, ``=``, a GGML type name (llama-quantize compares
them case-insensitively; first match wins; the file has no comment syntax, so it holds
nothing else). Unquantized (fp16) entries are written as ``F16``. With the file a
user requantizes with llama.cpp itself::

    llama-quantize --imatrix imatrix.dat --tensor-type-file plan.txt model-f32.gguf out.gguf Q8_0

Source: llama.cpp ``tools/quantize/quantize.cpp`` (``parse_tensor_type``,
``--tensor-type-file``). A format without a GGML type is an error naming the tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..models import load_model
from ..quant.apply import check_plan
from ..quant.ggml import TYPES
from .base import ExportError, exporter
from .names import arch_of, gguf_names


def ggml_type_name(tensor: str, fmt) -> str:
    if fmt.is_full:
        return "F16"
    if fmt.quantizer not in TYPES:
        raise ExportError(
            f"tensors[{tensor!r}].weight: format {fmt.key} has no GGML type "
            f"(GGUF types: {', '.join(sorted(TYPES))}); search with --space gguf"
        )
    return TYPES[fmt.quantizer].qtype.name


@exporter("llama.cpp-tensor-types", ".txt", "llama-quantize --tensor-type-file overrides (regex=TYPE per tensor)")
def write_tensor_types(plan, out: Path, model: str = "smollm2", check: bool = True) -> Path:
    lm = load_model(model)
    resolved = check_plan(lm.model, plan, check)
    formats = resolved.weight_formats()
    types = {n: ggml_type_name(n, f) for n, f in formats.items()}
    names = gguf_names(*arch_of(model, lm.model), sorted(formats))
    lines = [f"^{re.escape(names[n])}$={types[n]}" for n in sorted(formats)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out
