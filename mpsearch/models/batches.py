"""What a model runs on: a list of batches that knows how to run the model and take its loss.

Primitives, measured KL and evaluation never call a model directly; they ask the data:
``forward(model, i)`` runs batch ``i``, ``loss(model, items)`` is the mean training loss
over some batches, ``logprobs(model, i)`` the output distribution the KL compares. So
one pass works for any model with a loss and data:

- :class:`TokenBatches`: a causal LM on token windows ``[n, T]`` (next-token loss);
- :class:`LabelledBatches`: a classifier on inputs and labels (cross-entropy; accuracy).

A plain token tensor is accepted wherever batches are (:func:`as_batches` wraps it), and
hashes exactly as before, so existing cache entries stay valid. The data stays on the CPU;
each batch moves to the model's device where a pass runs it (:mod:`mpsearch.core.device`). A model that is neither
an LM nor a classifier needs its own :class:`Batches` subclass: a loss and data.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.device import model_device, to_model
from ..store.cache import tokens_hash
from .decoder import causal_logits, causal_loss, hf_style, loss_backward


class Batches:
    """A fixed, ordered list of batches; subclasses say how a model runs on them."""

    def __len__(self) -> int:
        raise NotImplementedError

    def forward(self, model: nn.Module, i: int) -> None:
        """Run batch ``i`` (forward hooks see every layer's input)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, items: Sequence[int]) -> torch.Tensor:
        """Mean training loss over the examples of batches ``items`` (differentiable)."""
        raise NotImplementedError

    def loss_backward(self, model: nn.Module, i: int) -> None:
        self.loss(model, [i]).backward()

    def synflow_output(self, model: nn.Module) -> torch.Tensor:
        """Sum of the outputs of ``model`` (already made all-positive, float64) on an all-ones input."""
        raise NotImplementedError

    def digest(self) -> str:
        """Hash of the values, shapes and batching: the cache identity of this data."""
        raise NotImplementedError

    def head(self, batches: int, length: int | None = None) -> "Batches":
        """The first ``batches`` batches (``length``: of the first ``length`` positions, where that means something)."""
        raise NotImplementedError


def as_batches(data) -> Batches:
    """Token windows ``[n, T]`` become :class:`TokenBatches`; batches are returned as they are."""
    if isinstance(data, Batches):
        return data
    if isinstance(data, torch.Tensor) and data.dim() == 2 and not data.is_floating_point():
        return TokenBatches(data)
    raise TypeError(
        f"expected token windows [n, T] or Batches, got {type(data).__name__}"
        f"{tuple(data.shape) if isinstance(data, torch.Tensor) else ''}: give a loss function and data "
        "(a Batches subclass, see mpsearch.models.batches)"
    )


class TokenBatches(Batches):
    """A causal LM on token windows, one window per batch."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def forward(self, model: nn.Module, i: int) -> None:
        causal_logits(model, to_model(self.tokens[i].unsqueeze(0), model))

    def logits(self, model: nn.Module, i: int) -> torch.Tensor:
        """Next-token logits ``[T - 1, V]`` of window ``i``, on the model's device."""
        return causal_logits(model, to_model(self.tokens[i].unsqueeze(0), model))[0, :-1].float()

    def loss(self, model: nn.Module, items: Sequence[int]) -> torch.Tensor:
        return causal_loss(model, to_model(self.tokens[list(items)], model))

    def loss_backward(self, model: nn.Module, i: int) -> None:
        loss_backward(model, self.tokens[i].unsqueeze(0))

    def synflow_output(self, model: nn.Module) -> torch.Tensor:
        if not hf_style(model) or not hasattr(model, "get_input_embeddings"):
            raise ValueError("synflow runs an LM on all-ones embeddings: it needs a transformers model")
        hidden = model.get_input_embeddings().weight.shape[1]
        ones = torch.ones(1, self.tokens.shape[-1], hidden, dtype=torch.float64, device=model_device(model))
        return model(inputs_embeds=ones, use_cache=False).logits.sum()

    def digest(self) -> str:
        return tokens_hash(self.tokens)

    def head(self, batches: int, length: int | None = None) -> "TokenBatches":
        return TokenBatches(self.tokens[:batches, :length])


class LabelledBatches(Batches):
    """A classifier on inputs ``x[N, ...]`` (float) and labels ``y[N]``, ``batch_size`` examples a batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> None:
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"need as many labels as inputs (and at least one), got {len(x)} inputs, {len(y)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y, self.batch_size = x, y.long(), batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def numel(self) -> int:
        """How many examples (what a token tensor's ``numel()`` counts for an LM)."""
        return len(self.x)

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[s], self.y[s]

    def forward(self, model: nn.Module, i: int) -> None:
        model(to_model(self.batch(i)[0], model))

    def logits(self, model: nn.Module, i: int) -> torch.Tensor:
        """The logits of batch ``i``, on the model's device."""
        return model(to_model(self.batch(i)[0], model)).float()

    def loss(self, model: nn.Module, items: Sequence[int]) -> torch.Tensor:
        xs, ys = zip(*(self.batch(i) for i in items))
        return F.cross_entropy(model(to_model(torch.cat(xs), model)).float(), to_model(torch.cat(ys), model))

    def synflow_output(self, model: nn.Module) -> torch.Tensor:
        return model(torch.ones(1, *self.x.shape[1:], dtype=torch.float64, device=model_device(model))).sum()

    def digest(self) -> str:
        h = hashlib.sha256(f"labelled|{tuple(self.x.shape)}|{self.x.dtype}|{self.batch_size};".encode())
        h.update(self.x.contiguous().cpu().numpy().tobytes())
        h.update(self.y.contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:20]

    def head(self, batches: int, length: int | None = None) -> "LabelledBatches":
        n = batches * self.batch_size
        return LabelledBatches(self.x[:n], self.y[:n], self.batch_size)
