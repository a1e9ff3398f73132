"""``--to autoround``: AutoRound's ``layer_config``, one entry per planned module by exact name.

Format (AutoRound ``auto_round/compressors/layer_config_resolver.py``, ``resolve_layer_config``;
the ``layer_config`` argument of ``AutoRound(...)``): a dict from a layer name (or a regex)
to ``{"bits", "group_size", "sym"}``; ``bits: 16`` keeps a layer in full precision;
``group_size`` -1 is per channel. Written here with exact names only, so every planned
module resolves to its own entry. The file is that dict as JSON::

    AutoRound(model, tokenizer, layer_config=json.load(open("plan.autoround.json")))

AutoRound's integer weight kernels take 2, 3, 4 and 8 bits.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import exporter
from .int_schemes import plan_schemes

BITS = frozenset({2, 3, 4, 8})


def layer_config(schemes: dict) -> dict:
    return {name: ({"bits": 16} if s is None else s.gptq_fields()) for name, s in sorted(schemes.items())}


@exporter("autoround", ".json", "AutoRound layer_config: {module: {bits, group_size, sym}} by exact name")
def write_autoround(plan, out: Path, model: str = "smollm2", nearest: bool = False, check: bool = True) -> Path:
    schemes, _, _ = plan_schemes(plan, model, BITS, nearest, check)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(layer_config(schemes), indent=1) + "\n")
    return out
