"""Quantized weights of slow (tensor, format) pairs, kept for the next plan that uses them.

A search measures dozens of plans that differ in a few tensors. Round-to-nearest costs
milliseconds per tensor, but GPTQ, the IQ3_S lattice or the imatrix-weighted GGUF
searches cost 0.1-3 s, so re-quantizing every tensor of every measured plan dominated
the GGUF-space searches. A :class:`QuantMemo` keeps a result when computing it took at
least ``min_seconds`` (RTN never qualifies, so the default search holds nothing extra),
up to ``max_bytes`` in all, least recently used out first.

One memo belongs to one model (a search session): the key is the tensor's name, the
format's identity (key, params, quantizer version) and a digest of the importance the
quantizer read, not the weights themselves.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

import torch

from ..core.format import Format
from .quantizer import format_identity, quantize


def _digest(t: torch.Tensor | None) -> str:
    if t is None:
        return ""
    return hashlib.sha256(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


class QuantMemo:
    def __init__(self, max_bytes: int = 1 << 30, min_seconds: float = 0.02) -> None:
        self.max_bytes = int(max_bytes)
        self.min_seconds = float(min_seconds)
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def quantize(self, name: str, w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> torch.Tensor:
        """``quantize(w, fmt, importance)``, from the memo when this pair was kept."""
        key = (name, tuple(w.shape), format_identity(fmt), _digest(importance))
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        t0 = time.perf_counter()
        q = quantize(w, fmt, importance)
        if q.device.type == "cuda":  # time the work, not its launch
            torch.cuda.synchronize(q.device)
        size = q.numel() * q.element_size()
        if time.perf_counter() - t0 >= self.min_seconds and size <= self.max_bytes:
            self._items[key] = q
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
        return q

    def __len__(self) -> int:
        return len(self._items)
