"""A plan run by real kernels, and its decode time: what the latency cost models are checked against."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Mapping

import torch
from torch import nn

from ..core.format import Format
from .base import get_kernel, kernels_for

#: the order kernels are preferred in when nothing was measured (fused before unfused)
PREFERENCE = ("int4pack", "int8pack", "dequant", "dense")


class KernelLinear(nn.Module):
    """A linear layer whose weight lives in a kernel's layout."""

    def __init__(self, kernel: str, fmt: Format, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.kernel_name, self.fmt = kernel, fmt
        self.kernel = get_kernel(kernel)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        for k, v in self.kernel.pack(weight.detach(), fmt).items():
            self.register_buffer(k, v)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = dict(self.named_buffers())
        y = self.kernel.run(x.reshape(-1, self.in_features), packed, self.fmt).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt.key} via {self.kernel_name}"


def choose_kernel(fmt: Format, in_features: int, device: str = "cpu") -> str:
    """The kernel a format runs on when none is named: fused before unfused (:data:`PREFERENCE`)."""
    able = kernels_for(fmt, in_features, device)
    if not able:
        raise ValueError(f"no kernel runs {fmt.key} on rows of {in_features} on {device}")
    return min(able, key=lambda k: PREFERENCE.index(k) if k in PREFERENCE else len(PREFERENCE))


def deploy(
    model: nn.Module, formats: Mapping[str, Format], kernels: Mapping[str, str] | None = None, head_dense: bool = True
) -> nn.Module:
    """A copy of ``model`` whose linears in ``formats`` run through kernels (``kernels[name]``, or
    by :func:`choose_kernel`), and its LM head in bf16 (``head_dense``). The weights packed are the model's as they are:
    pass a model with
    the plan applied (:func:`mpsearch.quant.applied`) for a plan's numbers, any model for its speed."""
    out = copy.deepcopy(model)
    for name, fmt in formats.items():
        parent, _, attr = name.rpartition(".")
        lin = out.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is a {type(lin).__name__}; kernels run linear layers only")
        k = (kernels or {}).get(name) or choose_kernel(fmt, lin.in_features)
        setattr(out.get_submodule(parent) if parent else out, attr, KernelLinear(k, fmt, lin.weight, lin.bias))
    head = getattr(out, "lm_head", None)
    if head_dense and isinstance(
        head, nn.Linear
    ):  # the LM head stays unquantized, stored in 16 bits as the cost models count it
        out.lm_head = KernelLinear("dense", Format.full(), head.weight, head.bias)
    return out.eval()


def decode_ms(
    model: nn.Module,
    context: int = 512,
    steps: int = 32,
    batch: int = 1,
    warmup: int = 3,
    seed: int = 0,
    vocab: int | None = None,
) -> dict:
    """Milliseconds per decode step after a prompt of ``context`` tokens (random ids): the median
    of ``steps`` timed steps, with the quartiles. The prompt is prefilled in chunks of 512."""
    from transformers import DynamicCache

    vocab = vocab or model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, context), generator=g)
    times = []
    with torch.no_grad():
        cache = DynamicCache()
        for s in range(0, context, 512):
            out = model(input_ids=ids[:, s : s + 512], past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for i in range(warmup + steps):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=4)
    return {
        "median_ms": statistics.median(times),
        "p25_ms": q[0],
        "p75_ms": q[2],
        "steps": steps,
        "context": context,
        "batch": batch,
    }


def prefill_ms(model: nn.Module, tokens: int = 512, repeats: int = 3, batch: int = 1, seed: int = 0) -> float:
    """Median milliseconds of one forward over a prompt of ``tokens`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g)
    times = []
    with torch.no_grad():
        model(input_ids=ids[:, :8])
        for _ in range(repeats):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
