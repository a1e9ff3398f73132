"""Non-uniform quantizers from the seeds, each with its stored cost.

All but ``kmeans`` share one layout: per group of ``group_size`` weights an fp16
absmax scale, and ``bits``-bit indices into a fixed set of levels in ``[-1, 1]``:
``bits + 16 / group`` bits per weight. A per-tensor constant (a searched base or
exponent) is one fp16 number per tensor and is not counted (under 1e-4 bits per weight
on these models).

- ``nf``: NormalFloat levels, quantiles of a normal distribution (QLoRA's NF4 at 4 bits);
- ``log``: zero and ``+-base^-k`` with the base searched per tensor (AdaLog);
- ``post``: zero and ``+-sqrt(2)^-k``, a fixed look-up table (POST);
- ``nupes``: a uniform grid raised to a power ``gamma`` searched per tensor (NUPES);
- ``kmeans``: a Lloyd-Max codebook of ``2^bits`` fp16 values per group (per row with
  ``group_size = -1``, SqueezeLLM-style), fitted to the importance-weighted weights:
  ``bits + 2^bits * 16 / group`` bits per weight. (KVQuant weights by Fisher per
  element; here the weight is the layer input's mean square per column, the imatrix.)

Searches (base, exponent, codebook) minimise the importance-weighted squared error.
"""

from __future__ import annotations

import math

import torch

from ..core.format import Format
from ..core.registry import register
from .ggml_search import nearest
from .quantizer import SCALE_BITS, Quantizer, groups_of


def _groups(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None, name: str):
    return groups_of(w, fmt, importance, name)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(max=65504.0).to(torch.float16).to(torch.float32)


def _snap(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``x`` (groups along the last axis) to ``scale * nearest level``, scale the group's fp16 absmax."""
    levels = levels.to(x.device)
    scale = _fp16(x.abs().amax(-1, keepdim=True))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return levels[nearest(levels, x / scale)] * scale


def _best(x: torch.Tensor, imp: torch.Tensor, candidates: list[torch.Tensor]) -> torch.Tensor:
    """The quantized tensor of the level set with the least importance-weighted error over the tensor."""
    best, best_err = None, math.inf
    for levels in candidates:
        q = _snap(x, levels)
        err = float(((q - x) ** 2 * imp).sum())
        if err < best_err:
            best, best_err = q, err
    return best


def nf_levels(bits: int) -> torch.Tensor:
    """NormalFloat: 2^(b-1) positive and 2^(b-1)-1 negative normal quantiles and zero, scaled to [-1, 1]."""
    n = 2**bits
    offset = 1 - 0.5 * (1 / (2 * n) + 1 / (2 * n - 2))  # 0.9677 at 4 bits, QLoRA's choice
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)])
    return (v / v.abs().max()).sort().values.float()


def log_levels(bits: int, base: float) -> torch.Tensor:
    """Zero and +-base^-k, k = 0 .. 2^(b-1)-2: 2^b - 1 levels."""
    k = torch.arange(2 ** (bits - 1) - 1, dtype=torch.float64)
    mags = base ** (-k)
    return torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags]).sort().values.float()


def power_levels(bits: int, gamma: float) -> torch.Tensor:
    """A symmetric uniform grid of 2^b - 1 levels in [-1, 1], each raised to ``gamma`` (sign kept)."""
    u = torch.linspace(-1, 1, 2**bits - 1, dtype=torch.float64)
    return (u.sign() * u.abs() ** gamma).float()


#: AdaLog's search grid for the base, and NUPES's for the exponent
LOG_BASES = tuple(2 ** (1 / a) for a in (1, 1.25, 1.5, 2, 2.5, 3, 4))
GAMMAS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


def quantize_nf(w, fmt, importance=None):
    x, _ = _groups(w, fmt, importance, "nf")
    return _snap(x, nf_levels(fmt.bits)).reshape(w.shape).to(w.dtype)


def quantize_log(w, fmt, importance=None):
    x, imp = _groups(w, fmt, importance, "log")
    return _best(x, imp, [log_levels(fmt.bits, b) for b in LOG_BASES]).reshape(w.shape).to(w.dtype)


def quantize_post(w, fmt, importance=None):
    x, _ = _groups(w, fmt, importance, "post")
    return _snap(x, log_levels(fmt.bits, math.sqrt(2))).reshape(w.shape).to(w.dtype)


def quantize_nupes(w, fmt, importance=None):
    x, imp = _groups(w, fmt, importance, "nupes")
    return _best(x, imp, [power_levels(fmt.bits, g) for g in GAMMAS]).reshape(w.shape).to(w.dtype)


def quantize_kmeans(w, fmt, importance=None, iterations: int = 12):
    """Weighted Lloyd-Max per group: codebooks start at the group's weighted quantiles."""
    x, imp = _groups(w, fmt, importance, "kmeans")
    rows = x.reshape(-1, x.shape[-1])  # one codebook per row of groups
    wts = imp.expand_as(x).reshape(-1, x.shape[-1])
    k = 2**fmt.bits
    srt, idx = rows.sort(-1)
    cw = wts.gather(-1, idx).cumsum(-1)
    cw = cw / cw[:, -1:]
    probs = (torch.arange(k, dtype=torch.float32, device=x.device) + 0.5) / k
    cent = srt.gather(-1, torch.searchsorted(cw, probs.expand(len(rows), k).contiguous()).clamp(max=rows.shape[-1] - 1))
    for _ in range(iterations):
        cent = cent.sort(-1).values
        assign = torch.searchsorted((cent[:, 1:] + cent[:, :-1]) / 2, rows.contiguous())
        num = torch.zeros_like(cent).scatter_add_(1, assign, rows * wts)
        den = torch.zeros_like(cent).scatter_add_(1, assign, wts)
        cent = torch.where(den > 0, num / den.clamp_min(1e-30), cent)
    cent = _fp16(cent.abs()) * cent.sign()  # the codebook is stored as fp16
    cent = cent.sort(-1).values
    assign = torch.searchsorted((cent[:, 1:] + cent[:, :-1]) / 2, rows.contiguous())
    return cent.gather(-1, assign).reshape(w.shape).to(w.dtype)


def _scaled(fmt: Format, in_features: int) -> float:
    return fmt.bits + SCALE_BITS / fmt.group_len(in_features)


def _codebook(fmt: Format, in_features: int) -> float:
    return fmt.bits + 2**fmt.bits * 16 / fmt.group_len(in_features)


def _symmetric(name: str, fn, about: str, searched: bool) -> Quantizer:
    return register("quantizer", name)(
        Quantizer(
            name,
            fn,
            version="v1",
            min_bits=2,
            min_bits_symmetric=2,
            fixed=(("symmetric", True),),
            params=("outliers",),
            storage_bits=_scaled,
            uses_importance=searched,
            about=about,
        )
    )


NF = _symmetric("nf", quantize_nf, "NormalFloat levels (QLoRA's NF4 at 4 bits), fp16 absmax scale per group", False)
LOG = _symmetric(
    "log", quantize_log, "zero and +-base^-k, base searched per tensor (AdaLog), fp16 absmax scale per group", True
)
POST = _symmetric(
    "post", quantize_post, "zero and +-sqrt(2)^-k look-up table (POST), fp16 absmax scale per group", False
)
NUPES = _symmetric(
    "nupes", quantize_nupes, "uniform grid raised to a searched power (NUPES), fp16 absmax scale per group", True
)
KMEANS = register("quantizer", "kmeans")(
    Quantizer(
        "kmeans",
        quantize_kmeans,
        version="v1",
        min_bits=1,
        min_bits_symmetric=1,
        fixed=(("symmetric", True),),
        params=("outliers",),
        storage_bits=_codebook,
        uses_importance=True,
        about="importance-weighted Lloyd-Max codebook of 2^bits fp16 values per group (per row: SqueezeLLM-style)",
    )
)
