"""``--to gptqmodel``: a GPTQModel ``quantize_config.json`` whose ``dynamic`` holds the per-module plan.

Format (GPTQModel ``gptqmodel/quantization/config.py``: ``QuantizeConfig`` and
``dynamic_get``): base ``bits``, ``group_size`` (-1 = per channel), ``sym``, ``desc_act``;
``dynamic`` maps a regex over the module name to overrides, first match wins;
a ``+:`` prefix (or none) applies the overrides, ``-:`` skips the module (left unquantized).
Written here: the most common planned scheme is the base, and every module whose scheme
differs, or that stays unquantized, gets an anchored, escaped regex ``^name$`` (no key
can match another module). GPTQModel's kernels take 2, 3, 4 and 8 bits.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from .base import exporter
from .int_schemes import plan_schemes

BITS = frozenset({2, 3, 4, 8})


def gptqmodel_dict(schemes: dict) -> dict:
    quantized = [s for s in schemes.values() if s is not None]
    base = Counter(quantized).most_common(1)[0][0] if quantized else None
    dynamic = {}
    for name, s in sorted(schemes.items()):
        key = f"^{re.escape(name)}$"
        if s is None:
            dynamic[f"-:{key}"] = {}
        elif s != base:
            dynamic[f"+:{key}"] = s.gptq_fields()
    head = (
        base.gptq_fields() if base else {"bits": 4, "group_size": 128, "sym": True}
    )  # nothing quantized: any base will do
    return {**head, "desc_act": False, "quant_method": "gptq", "checkpoint_format": "gptq", "dynamic": dynamic}


@exporter(
    "gptqmodel",
    ".json",
    "GPTQModel quantize_config.json: base scheme plus dynamic per-module overrides (anchored, escaped regexes)",
)
def write_gptqmodel(plan, out: Path, model: str = "smollm2", nearest: bool = False, check: bool = True) -> Path:
    schemes, _, _ = plan_schemes(plan, model, BITS, nearest, check)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(gptqmodel_dict(schemes), indent=1) + "\n")
    return out
