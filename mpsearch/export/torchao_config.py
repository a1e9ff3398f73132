"""``--to torchao``: an ``FqnToConfig`` serialised with torchao's own ``config_to_dict``.

Format (torchao ``torchao/core/config.py``: ``config_to_dict`` / ``config_from_dict``;
``FqnToConfig`` in ``torchao/quantization/quant_api.py``): ``fqn_to_config`` maps each
module's fully qualified name to an ``IntxWeightOnlyConfig(weight_dtype=torch.intN,
granularity=PerGroup(g) | PerAxis(0), mapping_type=SYMMETRIC | ASYMMETRIC)``, or to
null (left in full precision). Read back and applied with::

    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_
    cfg = config_from_dict(json.load(open("plan.torchao.json")))
    quantize_(model, cfg, filter_fn=None)

Needs torchao installed (``pip install --no-deps torchao``): the file is torchao's own
serialisation, so it is made by torchao. 1-8 bit integers are expressible
(``torch.int1``-``torch.int7``, ``torch.int8``). torchao rounds on its own affine grid, which
mpsearch's ``affine`` quantizer reproduces bit for bit (:mod:`mpsearch.quant.affine`); a plan
in other integer formats (``uniform``, ``clip``, ``gptq``) would come out of torchao with other
weights than the ones measured, so it is refused unless ``--nearest`` (then each tensor keeps
its bits, groups and symmetry on torchao's grid, and the change is logged).
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import ExportError, exporter
from .int_schemes import plan_schemes

BITS = frozenset(range(1, 9))


def torchao_config(schemes: dict):
    """The ``FqnToConfig`` of per-tensor :class:`IntScheme` (None = unquantized)."""
    import torch
    from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    def one(s):
        if s is None:
            return None
        return IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{s.bits}"),
            granularity=PerAxis(0) if s.group_size is None else PerGroup(s.group_size),
            mapping_type=MappingType.SYMMETRIC if s.symmetric else MappingType.ASYMMETRIC,
        )

    return FqnToConfig(fqn_to_config={n: one(s) for n, s in sorted(schemes.items())})


@exporter("torchao", ".json", "torchao FqnToConfig of IntxWeightOnlyConfig per module (torchao's config_to_dict JSON)")
def write_torchao(plan, out: Path, model: str = "smollm2", nearest: bool = False, check: bool = True) -> Path:
    try:
        from torchao.core.config import config_to_dict
    except ImportError:
        raise ExportError(
            "--to torchao writes torchao's own serialisation: install it with `pip install --no-deps torchao`"
        ) from None
    schemes, _, _ = plan_schemes(plan, model, BITS, nearest, check, quantizers=frozenset({"affine"}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config_to_dict(torchao_config(schemes)), indent=1) + "\n")
    return out
