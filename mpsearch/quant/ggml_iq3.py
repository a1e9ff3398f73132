"""GGUF IQ3_S: llama.cpp's 3.4375-bit lattice type, searched in torch, stored bit-exactly.

A block of 256 weights holds an fp16 scale ``d``, a 4-bit scale ``l`` per 32, one
sign bit per weight, and per group of 4 a 9-bit index into a fixed grid of 512 points
whose coordinates are the odd numbers 1..15 (ggml's ``iq3s_grid``, read here from the
``gguf`` package). A weight decodes to ``d * (1 + 2 l) * grid[index][k] * sign``.

The search follows llama.cpp's ``quantize_row_iq3_s_impl`` in shape: per 32-weight
sub-block, 7 trial scales around ``max|x| / 15`` (llama.cpp: 19); for each, every group of 4 takes
its *weighted-nearest* grid point (llama.cpp rounds each coordinate and then tries a
few grid neighbours; here all 512 points are scored, as one matrix product); the
sub-block keeps the trial with the best least-squares fit, then its points are picked
once more at that fit's scale. The error weights are llama.cpp's: with an imatrix
``importance * sqrt(sigma2 + x^2)`` (``sigma2 = 2 * mean(x^2)`` over the 256), else
``x^2``. The super-block scale ``d`` is chosen from 31 candidates around
``max(scale) / 31`` (llama.cpp takes that times 1.033) by the weighted error of the
rounded 4-bit scales.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.quants import IQ3_S

Codes = dict[str, torch.Tensor]


def _grid() -> torch.Tensor:
    IQ3_S.init_grid()
    return torch.from_numpy(np.array(IQ3_S.grid, dtype=np.float32).reshape(512, 4))


GRID = _grid()
#: trial scales per sub-block: max|x| / (15 + 0.2 k) for k = -9, -6, ..., 9. llama.cpp
#: tries every k in -9..9; on random and real weights every third gives the same
#: weighted error to 1e-4 (relative) at 40% of the time
TRIALS = [15 + 0.2 * k for k in range(-9, 10, 3)]
#: super-block scale candidates, times max(scale) / 31
D_FACTORS = torch.linspace(0.90, 1.20, 31)


def _nearest(cross: torch.Tensor, wg2: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per group, the grid index minimising ``sum w (a - scale g)^2`` = ``scale^2 wg2 - 2 scale cross`` + const."""
    return torch.addcmul(cross, scale.unsqueeze(-1), wg2, value=-0.5).argmax(-1)


def _fit(
    a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, grid: torch.Tensor = GRID
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum w a q`` and ``sum w q^2`` per sub-block for the chosen points (``a, w: [M, 8, 4]``; ``grid`` on their
    device)."""
    q = grid[idx]
    return (w * a * q).sum((1, 2)), (w * q * q).sum((1, 2))


def encode(x: torch.Tensor, imp: torch.Tensor | None) -> Codes:
    """``x [N, 256]`` -> codes ``d [N]`` (fp16), ``l [N, 8]``, ``idx [N, 64]``, ``neg [N, 256]``."""
    n = x.shape[0]
    if imp is not None:
        sigma2 = 2 * (x * x).mean(-1, keepdim=True)
        w = imp * (sigma2 + x * x).sqrt()
    else:
        w = x * x
    a = x.abs().reshape(n * 8, 8, 4)
    w = w.reshape(n * 8, 8, 4)
    grid = GRID.to(x.device)
    cross = (w * a) @ grid.T  # [M, 8, 512]
    wg2 = w @ (grid * grid).T
    mx = a.amax((1, 2))
    safe = torch.where(mx > 0, mx, torch.ones_like(mx))
    best = torch.full_like(mx, -1.0)
    idx = torch.zeros(a.shape[:2], dtype=torch.long, device=x.device)
    scale = torch.zeros_like(mx)
    for t in TRIALS:
        trial = _nearest(cross, wg2, (safe / t).unsqueeze(-1))
        sqx, sq2 = _fit(a, w, trial, grid)
        score = torch.where(sq2 > 0, sqx * sqx / sq2.clamp_min(1e-30), torch.zeros_like(sq2))
        better = score > best
        best = torch.where(better, score, best)
        idx = torch.where(better.unsqueeze(-1), trial, idx)
        scale = torch.where(better, sqx / sq2.clamp_min(1e-30), scale)
    again = _nearest(
        cross, wg2, torch.where(scale > 0, scale, safe / 15).unsqueeze(-1)
    )  # once more at the fitted scale
    sqx, sq2 = _fit(a, w, again, grid)
    score = torch.where(sq2 > 0, sqx * sqx / sq2.clamp_min(1e-30), torch.zeros_like(sq2))
    better = score > best
    idx = torch.where(better.unsqueeze(-1), again, idx)
    sqx, sq2 = _fit(a, w, idx, grid)
    scale = torch.where(sq2 > 0, sqx / sq2.clamp_min(1e-30), torch.zeros_like(sq2)).clamp_min(0).reshape(n, 8)
    sqx, sq2 = sqx.reshape(n, 8), sq2.reshape(n, 8)

    # the super-block scale: the candidate whose rounded 4-bit scales fit best
    top = scale.amax(1, keepdim=True)
    d = (top / 31 * D_FACTORS.to(x.device).view(1, -1)).clamp(max=65504.0).to(torch.float16).float()  # [n, 31]
    dsafe = torch.where(d > 0, d, torch.ones_like(d))
    lev = (0.5 * (scale.unsqueeze(1) / dsafe.unsqueeze(-1) - 1)).round().clamp(0, 15)  # [n, 31, 8]
    db = d.unsqueeze(-1) * (1 + 2 * lev)
    err = (db * db * sq2.unsqueeze(1) - 2 * db * sqx.unsqueeze(1)).sum(-1)
    pick = err.argmin(1, keepdim=True)
    d16 = torch.gather(d, 1, pick).squeeze(1).to(torch.float16)
    lev = torch.gather(lev, 1, pick.unsqueeze(-1).expand(-1, 1, 8)).squeeze(1)
    return {
        "d": d16,
        "l": lev.to(torch.int16),
        "idx": idx.reshape(n, 64).to(torch.int16),
        "neg": (x < 0).reshape(n, 256),
    }


def decode(c: Codes) -> torch.Tensor:
    """gguf-py's order: ``(d * (1 + 2 l)) * grid * sign`` in float32."""
    n = c["d"].shape[0]
    db = (c["d"].float().unsqueeze(1) * (1 + 2 * c["l"].float())).repeat_interleave(32, 1)
    dev = c["idx"].device
    g = GRID.to(dev)[c["idx"].long()].reshape(n, 256)
    sign = torch.where(c["neg"], torch.tensor(-1.0, device=dev), torch.tensor(1.0, device=dev))
    return db * g * sign


def pack(c: Codes) -> np.ndarray:
    """110 bytes per block: d, qs[64] (index low bytes), qh[8] (9th bits), signs[32], scales[4]."""
    n = c["d"].shape[0]
    idx = c["idx"].to(torch.int32)
    qs = (idx & 0xFF).to(torch.uint8)
    bit = torch.arange(8, dtype=torch.int32)
    qh = (((idx >> 8) & 1).reshape(n, 8, 8) << bit).sum(-1).to(torch.uint8)  # byte ib, bit k: group 8 ib + k
    signs = (c["neg"].to(torch.int32).reshape(n, 32, 8) << bit).sum(-1).to(torch.uint8)  # byte j, bit i: weight 8 j + i
    lev = c["l"].to(torch.uint8)
    scales = lev[:, 0::2] | (lev[:, 1::2] << 4)
    d = c["d"].reshape(-1, 1).numpy().view(np.uint8).reshape(n, 2)
    return np.concatenate([d, qs.numpy(), qh.numpy(), signs.numpy(), scales.numpy()], 1)
