"""KV-cache quantizers for the ``k_cache`` / ``v_cache`` targets, and their exact storage.

A layer's cache holds, per token, a key and a value vector of ``width = kv_heads x
head_dim`` elements. The hooks (:mod:`mpsearch.quant.hooks`) quantize keys at the output
of ``k_proj``, i.e. **before the rotary embedding** (the cache then holds RoPE of the
dequantized key, which is what a kernel that stores pre-RoPE keys computes), and values at
the output of ``v_proj``. Tokens at positions below ``sinks`` stay fp16.

- ``kvtok``: the naive baseline, per-token asymmetric uniform in groups of ``group_size``
  (``-1``: one group per head), an fp16 minimum and scale per group, for keys and values alike.
- ``kvquant`` (KVQuant, Hooper et al. 2024):
  - keys per channel, with each channel's range calibrated offline (fp16 centre and
    half-range per channel); values per token, each group's range computed on the fly;
  - ``nuq``: a non-uniform codebook of ``2^bits`` levels on the normalised range,
    fitted per layer by k-means weighted by each element's Fisher information (the
    squared loss gradient), as KVQuant's sensitivity-weighted nuq datatype;
  - ``outliers``: dense-and-sparse per vector: in every key row (and every value group)
    the ``ceil(outliers x length)`` elements furthest out are kept exact in fp16 with a
    16-bit index, and the range is fitted without them;
  - ``sinks``: the first tokens kept in fp16 (attention sinks).

Storage counts everything: the codes, every scale and zero, the per-channel calibration,
the codebook, each outlier's value and index, and the fp16 sink tokens
(:func:`storage_bits`; bits per element = that / (tokens x width)).
"""

from __future__ import annotations

import math

import torch

from ..core.format import PER_CHANNEL, Format, FormatError
from ..core.registry import register
from .quantizer import TargetQuantizer

SCALE_BITS = 16
VALUE_BITS = 16
INDEX_BITS = 16
KMEANS_ITERS = 25
#: KVQuant's defaults: 1% outliers, the first token an fp16 sink, a non-uniform codebook
KVQUANT_DEFAULTS = (("nuq", True), ("outliers", 0.01), ("sinks", 1))


def _p(fmt: Format, key: str, default):
    return dict(fmt.params).get(key, default)


def group_len(fmt: Format, head_dim: int) -> int:
    return head_dim if fmt.group_size == PER_CHANNEL else fmt.group_size


def _levels(fmt: Format, calib, device=None) -> torch.Tensor:
    if calib is not None and "codebook" in calib:
        return calib["codebook"].to(device=device, dtype=torch.float32)
    return torch.linspace(-1.0, 1.0, 2**fmt.bits, device=device)


def _snap(z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each element of ``z`` to its nearest level (levels sorted)."""
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(z.clamp(-1, 1), mids)]


#: smallest stored half-range: fp16's smallest normal number (a constant channel or group needs any positive one)
MIN_HALF = 2.0**-14


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def _top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` largest entries of each row of ``score``."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(-1, score.topk(k, dim=-1).indices, True)
    return mask


# ---------------------------------------------------------------- naive per-token
def quantize_kvtok(
    x: torch.Tensor, fmt: Format, calib=None, head_dim: int = 64, target: str = "v_cache"
) -> torch.Tensor:
    g = group_len(fmt, head_dim)
    r = x.reshape(-1, x.shape[-1] // g, g).to(torch.float32)
    lo, hi = _fp16(r.amin(-1, keepdim=True)), r.amax(-1, keepdim=True)
    scale = _fp16((hi - lo) / (2**fmt.bits - 1)).clamp_min(MIN_HALF)
    q = ((r - lo) / scale).round().clamp(0, 2**fmt.bits - 1) * scale + lo
    return q.reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------- KVQuant
def _normalise(x: torch.Tensor, fmt: Format, calib, head_dim: int, target: str):
    """``(z, mid, half, outlier mask, r)``: ``x`` (rows, or groups for values) mapped to [-1, 1] around
    its per-channel (keys, calibrated) or per-group (values, on the fly) range, outliers excluded."""
    p = float(_p(fmt, "outliers", 0.0) or 0.0)
    if target == "k_cache":
        r = x.reshape(-1, x.shape[-1]).to(torch.float32)
        mid = calib["mid"].to(r.device).reshape(1, -1)
        half = calib["half"].to(r.device).reshape(1, -1).clamp_min(MIN_HALF)
        z = (r - mid) / half
        mask = _top_mask(z.abs(), math.ceil(p * r.shape[-1]) if p else 0)
        return z, mid, half, mask, r
    g = group_len(fmt, head_dim)
    r = x.reshape(-1, x.shape[-1] // g, g).to(torch.float32)
    mask = _top_mask((r - r.mean(-1, keepdim=True)).abs(), math.ceil(p * g) if p else 0)
    big = torch.finfo(torch.float32).max
    lo = torch.where(mask, big, r).amin(-1, keepdim=True)
    hi = torch.where(mask, -big, r).amax(-1, keepdim=True)
    mid, half = _fp16((hi + lo) / 2), _fp16((hi - lo) / 2).clamp_min(MIN_HALF)
    return (r - mid) / half, mid, half, mask, r


def quantize_kvquant(
    x: torch.Tensor, fmt: Format, calib=None, head_dim: int = 64, target: str = "v_cache"
) -> torch.Tensor:
    z, mid, half, mask, r = _normalise(x, fmt, calib, head_dim, target)
    q = torch.where(mask, _fp16(r), _snap(z, _levels(fmt, calib, z.device)) * half + mid)
    return q.reshape(x.shape).to(x.dtype)


def weighted_kmeans(z: torch.Tensor, w: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """Sorted 1-D centroids minimising ``sum w (z - c)^2``, started at the weighted quantiles."""
    order = z.argsort()
    z, w = z[order], w[order].clamp_min(1e-20)
    cw = w.cumsum(0) / w.sum()
    c = z[torch.searchsorted(cw, (torch.arange(k, device=z.device) + 0.5) / k).clamp(max=z.numel() - 1)].clone()
    for _ in range(iters):
        c = c.sort().values
        idx = torch.bucketize(z, (c[1:] + c[:-1]) / 2)
        num = torch.zeros(k, device=z.device).index_add_(0, idx, w * z)
        den = torch.zeros(k, device=z.device).index_add_(0, idx, w)
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c)
    return _fp16(c.sort().values)


def calibrate_kvquant(
    x: torch.Tensor, g: torch.Tensor | None, fmt: Format, head_dim: int = 64, target: str = "v_cache"
) -> dict:
    """Keys: each channel's centre and half-range between the ``outliers/2`` and ``1 - outliers/2``
    quantiles. With ``nuq``: the codebook, k-means of the normalised calibration values weighted by
    their squared gradients (uniform weights without gradients)."""
    out: dict[str, torch.Tensor] = {}
    r = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if target == "k_cache":
        p = float(_p(fmt, "outliers", 0.0) or 0.0)
        lo = torch.quantile(r, p / 2, dim=0) if p else r.amin(0)
        hi = torch.quantile(r, 1 - p / 2, dim=0) if p else r.amax(0)
        out["mid"], out["half"] = _fp16((hi + lo) / 2), _fp16((hi - lo) / 2).clamp_min(MIN_HALF)
    if _p(fmt, "nuq", False):
        z, _, _, mask, _ = _normalise(x, fmt, out, head_dim, target)
        keep = ~mask.reshape(-1)
        w = (
            (g.reshape(-1).to(device=z.device, dtype=torch.float32) ** 2)
            if g is not None
            else torch.ones(z.numel(), device=z.device)
        )
        out["codebook"] = weighted_kmeans(z.reshape(-1)[keep].clamp(-1, 1), w[keep], 2**fmt.bits)
    return out


# ---------------------------------------------------------------- storage
def storage_bits(fmt: Format, target: str, tokens: int, width: int, head_dim: int) -> float:
    """Exact bits a layer's ``target`` cache of ``tokens`` vectors of ``width`` elements stores in ``fmt``."""
    if fmt.is_full:
        return float(tokens * width * 16)
    g = group_len(fmt, head_dim)
    if fmt.quantizer == "kvtok":
        return float(tokens * (width * fmt.bits + (width // g) * 2 * SCALE_BITS))
    p = float(_p(fmt, "outliers", 0.0) or 0.0)
    sinks = min(tokens, int(_p(fmt, "sinks", 0)))
    n = tokens - sinks
    total = sinks * width * 16 + n * width * fmt.bits
    if _p(fmt, "nuq", False):
        total += 2**fmt.bits * VALUE_BITS
    if target == "k_cache":
        total += width * 2 * SCALE_BITS + n * math.ceil(p * width) * (VALUE_BITS + INDEX_BITS)
    else:
        total += n * (width // g) * (2 * SCALE_BITS + math.ceil(p * g) * (VALUE_BITS + INDEX_BITS))
    return float(total)


def bits_per_element(fmt: Format, target: str, tokens: int, width: int, head_dim: int) -> float:
    return storage_bits(fmt, target, tokens, width, head_dim) / (tokens * width)


class KVQuantizer(TargetQuantizer):
    """A KV quantizer also needs the head size (its groups) and which cache it is (keys or values)."""

    def __call__(self, x, fmt, calib=None, head_dim: int = 64, target: str = "v_cache"):
        return self.fn(x, fmt, calib, head_dim, target)

    def check(self, fmt: Format) -> None:
        super().check(fmt)
        if fmt.is_full:
            return
        if fmt.bits > 8:
            raise FormatError(f"{self.name}: KV caches take 1..8 bits (or fp16), got {fmt.bits}")
        s = _p(fmt, "sinks", 0)
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise FormatError(f"{self.name}: sinks must be a whole number of tokens >= 0, got {s!r}")
        if not isinstance(_p(fmt, "nuq", False), bool):
            raise FormatError(f"{self.name}: nuq must be true or false")

    def needs_calibration(self, fmt: Format, target: str | None = None) -> bool:
        """KVQuant calibrates the keys' per-channel ranges, and a codebook where ``nuq``; values without one need
        nothing."""
        if fmt.is_full or self.name != "kvquant":
            return False
        return target != "v_cache" or bool(_p(fmt, "nuq", False))

    def fits_width(self, fmt: Format, width: int, head_dim: int) -> bool:
        return width % group_len(fmt, head_dim) == 0

    def default_fields(self) -> dict:
        return {
            "group_size": PER_CHANNEL,
            "symmetric": False,
            "params": KVQUANT_DEFAULTS if self.name == "kvquant" else (),
        }

    def key(self, fmt: Format) -> str:
        defaults = dict(self.default_fields()["params"])
        extra = ",".join(f"{k}={v}" for k, v in fmt.params if defaults.get(k, None) != v)
        missing = ",".join(f"{k}=off" for k in defaults if k not in dict(fmt.params))
        extra = ",".join(e for e in (extra, missing) if e)
        g = "" if fmt.group_size == PER_CHANNEL else f"g{fmt.group_size}"
        return f"{self.name}{fmt.bits}{g}" + (f"[{extra}]" if extra else "")


KVTOK = register("quantizer", "kvtok")(
    KVQuantizer(
        "kvtok",
        quantize_kvtok,
        min_bits=2,
        targets=("k_cache", "v_cache"),
        about="KV cache: naive per-token uniform, fp16 min and scale per head",
    )
)
KVQUANT = register("quantizer", "kvquant")(
    KVQuantizer(
        "kvquant",
        quantize_kvquant,
        params=("nuq", "outliers", "sinks"),
        min_bits=2,
        targets=("k_cache", "v_cache"),
        calibrate=calibrate_kvquant,
        wants_grads=True,
        storage=storage_bits,
        about="KV cache: KVQuant, pre-RoPE per-channel keys, per-token values, Fisher-weighted nuq codebook, 1% "
        "outliers, fp16 sink",
    )
)
