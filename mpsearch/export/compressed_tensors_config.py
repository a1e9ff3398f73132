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

from .base import ExportError, exporter
from .int_schemes import plan_schemes

BITS = frozenset(range(2, 9))


def input_ok(target: str, fmt) -> bool:
    """Layer inputs compressed-tensors expresses: symmetric int per token (dynamic) or per tensor (static), 2-8 bits."""
    return target == "input" and fmt.quantizer in ("tok", "tensor") and 2 <= fmt.bits <= 8


def input_args(fmt) -> dict | None:
    """``QuantizationArgs`` of a layer input's format (per-token dynamic, or per-tensor static)."""
    if fmt is None or fmt.is_full:
        return None
    token = fmt.quantizer == "tok"
    return {
        "num_bits": fmt.bits,
        "type": "int",
        "symmetric": True,
        "strategy": "token" if token else "tensor",
        "dynamic": token,
    }


def config_dict(schemes: dict, inputs: dict | None = None) -> dict:
    """The ``quantization_config`` dict of per-tensor :class:`IntScheme` (None = unquantized) and
    per-tensor input formats (``inputs``; a config group per distinct weight and input pair)."""
    inputs = inputs or {}
    groups: dict = {}
    for name, s in sorted(schemes.items()):
        if s is not None:
            a = input_args(inputs.get(name))
            groups.setdefault((s, json.dumps(a, sort_keys=True)), []).append(name)
    config_groups = {}
    for i, ((s, a), names) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][0].label, kv[0][1]))):
        weights = {
            "num_bits": s.bits,
            "type": "int",
            "symmetric": s.symmetric,
            "strategy": "channel" if s.group_size is None else "group",
            "group_size": s.group_size,
        }
        config_groups[f"group_{i}"] = {
            "targets": names,
            "weights": weights,
            "input_activations": json.loads(a),
            "output_activations": None,
        }
    ignore = sorted(n for n, s in schemes.items() if s is None)
    return {
        "quant_method": "compressed-tensors",
        "format": "fakequant",
        "quantization_status": "initialized",
        "config_groups": config_groups,
        "ignore": ignore,
    }


@exporter(
    "compressed-tensors",
    ".json",
    "compressed-tensors / llm-compressor quantization_config: one config group per scheme, "
    "exact module names; layer inputs per token (dynamic) or per tensor (static)",
    runtime_ok=input_ok,
)
def write_compressed_tensors(
    plan, out: Path, model: str = "smollm2", nearest: bool = False, check: bool = True
) -> Path:
    schemes, changes, _ = plan_schemes(plan, model, BITS, nearest, check)
    inputs = {n: f for (n, t), f in plan.runtime_formats().items() if t == "input"}
    unweighted = sorted(set(inputs) - {n for n, s in schemes.items() if s is not None})
    if unweighted:
        raise ExportError(
            f"tensors[{unweighted[0]!r}].input: compressed-tensors quantizes a layer's input only in a scheme "
            "with quantized weights, and this layer's weights stay fp16"
        )
    cfg = config_dict(schemes, inputs)
    try:  # validate with the package's own model where it is installed
        from compressed_tensors.quantization import QuantizationConfig

        cfg = json.loads(QuantizationConfig.model_validate(cfg).model_dump_json())
    except ImportError:
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cfg, indent=1) + "\n")
    return out
