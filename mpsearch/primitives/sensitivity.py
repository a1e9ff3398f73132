"""Measured sensitivity: the KL of the model's output when only one tensor is quantized.

The expensive ground truth per (tensor, format) that ExLlamaV2 and AIMET measure. Made
fast by reusing one reference pass: the inputs of every decoder layer (and the
arguments the model passes it: rotary embeddings, masks) are recorded once, so
quantizing a tensor of layer ``l`` only reruns layers ``l..L-1``, the final norm and
the head. Results are cached per model weights + tokens, saved after every layer, so
an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.device import device_parts, model_device
from ..core.layers import matrix, set_matrix
from ..core.plan import importance_digest
from ..models.batches import TokenBatches, as_batches
from ..models.decoder import decoder_parts
from ..quant import format_identity, get_quantizer, quantize
from ..store.cache import cache_dir, content_key, read_json, require, require_finite, tokens_hash, write_json

log = logging.getLogger(__name__)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def measured_kl(
    model: nn.Module,
    decisions,
    tokens: torch.Tensor,
    weights_key: str = "",
    use_cache: bool = True,
    progress: bool = True,
    importance: dict[str, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """One row per (member tensor, candidate format): ``kl`` = mean per-token KL(ref || quantized).

    ``decisions`` are the search space's decisions (each member is measured alone, in
    every format of its decision). ``weights_key`` identifies the weights for the cache
    (e.g. ``Primitives.weights``); without it nothing is cached. ``importance`` (per
    tensor) goes to the quantizers that weight their scale search by it.
    """
    pairs = [(m.name, f) for d in decisions for m in d.members for f in d.formats]
    importance = importance or {}
    path = None
    done: dict[tuple[str, str], float] = {}
    if use_cache and weights_key:
        key = kl_key(weights_key, tokens, pairs, importance, device=model_device(model))
        path = cache_dir() / "sensitivity" / f"{key}.json"
        done = _load(path, key, {(t, f.key) for t, f in pairs})
    todo = [(t, f) for t, f in pairs if (t, f.key) not in done]
    if done and todo:
        log.info(
            "measured KL: %d of %d (tensor, format) pairs cached by an earlier run; measuring the other %d",
            len(pairs) - len(todo),
            len(pairs),
            len(todo),
        )
    if todo:
        data = as_batches(tokens)
        if isinstance(data, TokenBatches) and decoder_parts(model) is not None:
            # a transformers decoder: rerun only the layers from the quantized one on
            tail, ref_logp = tail_runner(model, data.tokens)
            layer_index = layer_of
        else:  # anything else: the whole forward pass each time

            def tail(_layer: int) -> torch.Tensor:
                return torch.cat([F.log_softmax(data.logits(model, i), dim=-1) for i in range(len(data))])

            with torch.no_grad():
                ref_logp = tail(0)

            def layer_index(_name: str) -> int:
                return 0

        ref = Reference(ref_logp)
        modules = dict(model.named_modules())
        by_layer: dict[int, list] = {}
        for t, f in todo:
            by_layer.setdefault(layer_index(t), []).append((t, f))
        bar = tqdm(total=len(todo), desc="measured KL per (tensor, format)", disable=not progress, unit="pair")
        with torch.no_grad():
            for layer in sorted(by_layer):
                for t, f in by_layer[layer]:
                    mod = modules[t]
                    original = matrix(mod).detach().clone()
                    try:
                        set_matrix(mod, quantize(original, f, importance.get(t)))
                        done[(t, f.key)] = ref.kl(tail(layer))
                    finally:
                        set_matrix(mod, original)
                    bar.update()
                if path is not None:
                    write_json(
                        path, [[t, f, v] for (t, f), v in sorted(done.items())], key, SCHEMA
                    )  # per layer: an interruption loses at most one layer
        bar.close()
    return pd.DataFrame([(t, f.key, done[(t, f.key)]) for t, f in pairs], columns=["tensor", "format", "kl"])


def layer_of(name: str) -> int:
    m = _LAYER.search(name)
    if not m:
        raise ValueError(f"cannot tell which decoder layer {name!r} belongs to (expected 'layers.<N>.')")
    return int(m[1])


def tail_runner(model: nn.Module, tokens: torch.Tensor) -> tuple[Callable[[int], torch.Tensor], torch.Tensor]:
    """Record every decoder layer's call once; return ``tail(l)`` (log-probs from layer l on) and the reference log-
    probs."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None or not hasattr(body, "norm") or not hasattr(model, "lm_head"):
        raise ValueError(
            "measured KL needs a decoder with model.model.layers, model.model.norm and model.lm_head (Llama-style)"
        )
    calls: dict[int, tuple[tuple, dict]] = {}

    def recorder(i: int):
        def hook(module, args, kwargs):
            calls[i] = (tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args), dict(kwargs))

        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            ref = F.log_softmax(
                model(input_ids=tokens.to(model_device(model)), use_cache=False).logits[:, :-1].float(), dim=-1
            )
    finally:
        for h in handles:
            h.remove()

    def tail(start: int) -> torch.Tensor:
        args, kwargs = calls[start]
        hidden = args[0] if args else kwargs["hidden_states"]
        for i in range(start, len(layers)):
            a, kw = calls[i]
            if a:
                out = layers[i](hidden, *a[1:], **kw)
            else:
                out = layers[i](**{**kw, "hidden_states": hidden})
            hidden = out[0] if isinstance(out, tuple) else out
        logits = model.lm_head(body.norm(hidden))[:, :-1].float()
        return F.log_softmax(logits, dim=-1)

    return tail, ref


class Reference:
    """The reference distribution with its probabilities and entropy computed once."""

    def __init__(self, logp: torch.Tensor) -> None:
        self.p = logp.exp()
        self.neg_entropy = (self.p * logp).sum(-1)  # per position

    def kl(self, logq: torch.Tensor) -> float:
        """Mean over positions of KL(p || q) = sum p log p - sum p log q."""
        return float((self.neg_entropy - (self.p * logq).sum(-1)).mean())


SCHEMA = "measured-kl/v1"


def kl_key(
    weights_key: str, tokens: torch.Tensor, pairs, importance: dict[str, torch.Tensor] | None = None, device="cpu"
) -> str:
    """Everything the measured KL depends on: weights, tokens (values, shape), each format's
    identity, the importance vectors of the quantizers that read one, and the device it was
    measured on where that is not the CPU (:func:`mpsearch.core.device.device_parts`)."""
    parts = [weights_key, tokens_hash(tokens), sorted({(t, format_identity(f)) for t, f in pairs}), SCHEMA]
    used = {
        t: importance[t]
        for t, f in pairs
        if importance and t in importance and get_quantizer(f.quantizer).reads_importance(f)
    }
    if used:
        parts.append(importance_digest(used))
    return content_key(*parts, *device_parts(device))


def _load(path, key: str, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """Finished (tensor, format) values of a (possibly partial) run; a bad entry is removed and measured again."""

    def check(rows) -> None:
        require(
            isinstance(rows, list) and all(isinstance(r, list) and len(r) == 3 for r in rows),
            "not a list of [tensor, format, kl]",
        )
        require_finite((r[2] for r in rows), "a measured KL")
        require(all((r[0], r[1]) in pairs for r in rows), "it holds pairs this search does not have")

    rows = read_json(path, key, SCHEMA, check)
    return {(r[0], r[1]): float(r[2]) for r in rows} if rows else {}
