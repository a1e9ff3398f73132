"""``--to compressed-tensors``: the ``quantization_config`` that llm-compressor writes and vLLM reads.

Format (compressed-tensors ``QuantizationConfig``, ``src/compressed_tensors/quantization/
quant_config.py``, and ``QuantizationScheme`` / ``QuantizationArgs`` beside it): ``config_groups``
maps a group name to a scheme whose ``targets`` are module names, class names or ``re:``
regexes and whose ``weights`` are ``QuantizationArgs(num_bits, type="int", symmetric,
strategy="group" | "channel", group_size)``; ``ignore`` lists modules left alone; ``format``
says how the weights are stored (``fakequant``: this file is the recipe, the weights
are not packed). Written here: one group per distinct scheme, its ``targets`` the exact
module names (a regex can catch the wrong module); planned-unquantized tensors in
``ignore``. The file is the JSON value of config.json's ``quantization_config``, built
with the package's own pydantic model when it is installed so it validates on write.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import exporter
from .int_schemes import plan_schemes

BITS = frozenset(range(2, 9))


def config_dict(schemes: dict) -> dict:
    """The ``quantization_config`` dict of per-tensor :class:`IntScheme` (None = unquantized)."""
    groups: dict = {}
    for name, s in sorted(schemes.items()):
        if s is not None:
            groups.setdefault(s, []).append(name)
    config_groups = {}
    for i, (s, names) in enumerate(sorted(groups.items(), key=lambda kv: kv[0].label)):
        weights = {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric,
                   "strategy": "channel" if s.group_size is None else "group", "group_size": s.group_size}
        config_groups[f"group_{i}"] = {"targets": names, "weights": weights, "input_activations": None, "output_activations": None}
    ignore = sorted(n for n, s in schemes.items() if s is None)
    return {"quant_method": "compressed-tensors", "format": "fakequant", "quantization_status": "initialized",
            "config_groups": config_groups, "ignore": ignore}


@exporter("compressed-tensors", ".json", "compressed-tensors / llm-compressor quantization_config: one config group per scheme, exact module names")
def write_compressed_tensors(plan, out: Path, model: str = "smollm2", nearest: bool = False, check: bool = True) -> Path:
    schemes, changes, _ = plan_schemes(plan, model, BITS, nearest, check)
    cfg = config_dict(schemes)
    try:  # validate with the package's own model where it is installed
        from compressed_tensors.quantization import QuantizationConfig

        cfg = json.loads(QuantizationConfig.model_validate(cfg).model_dump_json())
    except ImportError:
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cfg, indent=1) + "\n")
    return out
