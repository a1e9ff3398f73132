"""A causal LM split into its body and its head, so the head can run a slice of positions at a time.

The logits of a whole sequence are T x vocabulary: 0.5 GB for Gemma's 262k vocabulary at
T = 512, more than the rest of a forward pass. Running the head on a slice of positions
at a time keeps one slice of logits in memory, with the same values.

A causal LM is either a transformers model (``model(input_ids=..., labels=..., use_cache=False)``
with ``.logits`` and ``.loss``) or a plain module whose ``model(ids)`` returns the logits
``[B, T, V]``: :func:`causal_logits` and :func:`causal_loss` run either.
"""

from __future__ import annotations

import functools
import inspect
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..core.device import to_model


def hf_style(model: nn.Module) -> bool:
    """Whether ``model`` takes transformers' keywords (``input_ids``, ``use_cache``); read once per class."""
    return _hf_forward(type(model))


@functools.cache
def _hf_forward(cls: type) -> bool:
    params = inspect.signature(cls.forward).parameters
    return "input_ids" in params and ("use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()))


def causal_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of token ids ``[B, T]`` (already on the model's device)."""
    if hf_style(model):
        return model(input_ids=ids, use_cache=False).logits
    out = model(ids)
    return getattr(out, "logits", out)


def causal_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over ``ids`` ``[B, T]`` (differentiable)."""
    if hf_style(model):
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    logits = causal_logits(model, ids)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def decoder_parts(model: nn.Module):
    """``(body, head, softcap)`` for a decoder whose outputs are ``head(body(ids))`` (optionally
    soft-capped, as Gemma does), or ``None`` when the model has another shape (then use its logits)."""
    body, head, cfg = getattr(model, "model", None), getattr(model, "lm_head", None), getattr(model, "config", None)
    if body is None or not isinstance(head, nn.Linear) or getattr(cfg, "logit_scale", None) is not None:
        return None
    if not hf_style(model):
        return None
    return body, head, getattr(cfg, "final_logit_softcapping", None)


def head(parts, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits of ``hidden`` positions (the soft cap applied where the model has one)."""
    _, lm_head, cap = parts
    logits = lm_head(hidden).float()
    return torch.tanh(logits / cap) * cap if cap else logits


def logit_slices(model: nn.Module, ids: torch.Tensor, positions: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits[B, P, V], targets[B, P])`` of the next-token predictions of ``ids``, ``positions`` at a time,
    on the model's device (``ids`` are moved there)."""
    ids = to_model(ids, model)
    parts = decoder_parts(model)
    targets = ids[:, 1:]
    if parts is None:
        logits = causal_logits(model, ids)[:, :-1]
        for s in range(0, targets.shape[1], positions):
            yield logits[:, s : s + positions].float(), targets[:, s : s + positions]
        return
    hidden = parts[0](input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    for s in range(0, targets.shape[1], positions):
        yield head(parts, hidden[:, s : s + positions]), targets[:, s : s + positions]


def loss_backward(model: nn.Module, ids: torch.Tensor, positions: int = 32) -> None:
    """``backward()`` of the mean next-token loss over ``ids`` ``[1, T]``.

    For a decoder the head and the loss run a slice of ``positions`` at a time and the
    body's backward once (:mod:`mpsearch.models.decoder`), so the logits of the whole
    sequence never exist at once, nor their gradient. Anything else: the model's own loss.
    """
    ids = to_model(ids, model)
    parts = decoder_parts(model)
    if parts is None or ids.shape[0] != 1:
        causal_loss(model, ids).backward()
        return
    hidden = parts[0](input_ids=ids, use_cache=False).last_hidden_state
    h = hidden.detach().requires_grad_(True)
    targets = ids[:, 1:]
    for s in range(0, targets.shape[1], positions):
        logits = head(parts, h[:, s : s + min(positions, targets.shape[1] - s)])
        t = targets[:, s : s + positions]
        (
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="sum") / targets.numel()
        ).backward()
    hidden.backward(h.grad)
