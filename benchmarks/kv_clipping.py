"""Why KVQuant loses to naive per-token at 8 bits (kv.csv): its key ranges are static and clip.

    .venv/bin/python benchmarks/kv_clipping.py

Calibrates ``kvquant8`` on the same 8 x 512 Sense and Sensibility tokens as ``kv.py`` and runs
the first 2048-token Persuasion window of ``kv.py``'s evaluation. Per layer it counts the keys
(past the fp16 sink token) that lie outside their channel's calibrated range and are not
among the row's 1% kept outliers: those are clipped to the range. Naive per-token ranges are
computed on the token itself and cannot clip.

Writes ``benchmarks/results/kv_clipping.json``: the clipped fraction per layer and overall.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from foundation import machine

from mpsearch.core.format import Format
from mpsearch.models import load_model, load_text, token_chunks
from mpsearch.models.data import DEFAULT_CALIBRATION, DEFAULT_EVALUATION
from mpsearch.quant.calibrate import calibrate
from mpsearch.quant.hooks import calib_for
from mpsearch.quant.kvcache import _normalise


def main() -> None:
    torch.set_num_threads(2)
    lm = load_model("smollm2")
    model = lm.model
    fmt = Format.parse("kvquant8")
    names = [f"model.layers.{i}.self_attn.k_proj" for i in range(model.config.num_hidden_layers)]
    calib = calibrate(
        model,
        {(n, "k_cache"): [fmt] for n in names},
        token_chunks(lm.tokenizer, load_text(DEFAULT_CALIBRATION), 512, 8),
    )
    ids = token_chunks(lm.tokenizer, load_text(DEFAULT_EVALUATION), 2048, 1)
    seen = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o[0].detach())) for n in names]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    per_layer, clipped, total = {}, 0, 0
    for n in names:
        z, _, _, outlier, _ = _normalise(
            seen[n][1:], fmt, calib_for(calib, n, "k_cache", fmt), model.config.head_dim, "k_cache"
        )
        clip = (z.abs() > 1) & ~outlier
        per_layer[n] = float(clip.float().mean())
        clipped, total = clipped + int(clip.sum()), total + clip.numel()
    out = {"machine": machine(2), "format": fmt.key, "clipped_fraction": clipped / total, "per_layer": per_layer}
    path = Path(__file__).parent / "results" / "kv_clipping.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"keys clipped by kvquant8's calibrated ranges: {clipped / total:.4%} ({path})")


if __name__ == "__main__":
    main()
