"""Weighted scale searches for block quantizers, vectorised over blocks and candidates.

They follow llama.cpp's ``make_qx_quants`` (symmetric), ``make_qkx2_quants``
(asymmetric, scale and min by weighted least squares) and the IQ4_NL codebook search:
try a small set of candidate inverse scales around the naive one, fit the best scale
for the codes each candidate rounds to, keep the candidate with the lowest weighted
squared error. All arguments are ``[blocks, block_len]`` float32 tensors; ``w`` is the
per-element weight of the error (``>= 0``).
"""

from __future__ import annotations

import torch


def _pick(scores: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Along the candidate axis 0, the entries where ``scores`` ([K, N]) is largest."""
    best = scores.argmax(0)  # [N]
    out = []
    for t in tensors:
        idx = best.view(1, -1, *([1] * (t.dim() - 2))).expand(1, *t.shape[1:])
        out.append(t.gather(0, idx)[0])
    return out


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per block, the element of largest magnitude with its sign, ``[N, 1]``."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


def symmetric(
    x: torch.Tensor, w: torch.Tensor, nmax: int, lo: int, hi: int, steps: int = 9, step: float = 0.1
) -> torch.Tensor:
    """Scale per block (``[N, 1]``, signed) for codes in ``[lo, hi]``; codes are then
    ``round(x / scale)``. Candidates ``-(nmax + step*k) / signed_absmax`` for ``|k| <= steps``."""
    mx = signed_absmax(x)
    ks = torch.arange(-steps, steps + 1, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    safe = torch.where(mx == 0, torch.ones_like(mx), mx)
    iscale = -(nmax + step * ks) / safe  # [K, N, 1]
    l = (iscale * x).round().clamp(lo, hi)
    return _best_scale((w * x * l).sum(-1), (w * l * l).sum(-1), mx)


def _best_scale(sumqx: torch.Tensor, sumq2: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """Over candidates ``[K, N]``: the least-squares scale ``sumqx / sumq2`` of the candidate
    whose codes explain the most (``sumqx^2 / sumq2``); 0 for an all-zero block (``mx == 0``)."""
    score = torch.where(sumq2 > 0, sumqx * sumqx / sumq2.clamp_min(1e-30), torch.full_like(sumqx, -1.0))
    sumqx, sumq2 = _pick(score, sumqx, sumq2)
    scale = torch.where(sumq2 > 0, sumqx / sumq2.clamp_min(1e-30), torch.zeros_like(sumqx))
    return torch.where(mx[:, 0] == 0, torch.zeros_like(scale), scale).unsqueeze(-1)


def asymmetric(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (``>= 0``) and min (``<= 0``) per block, ``[N, 1]`` each, for codes in
    ``[0, nmax]``: ``x ~ scale * l + min``. Each candidate's codes get the weighted
    least-squares scale and min (min clamped to ``<= 0``, as llama.cpp does)."""
    mn = x.amin(-1, keepdim=True).clamp(max=0)
    mx = x.amax(-1, keepdim=True)
    rng = mx - mn
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    ks = torch.cat(
        [torch.zeros(1, device=x.device), rmin + rdelta * torch.arange(nstep + 1, dtype=torch.float32, device=x.device)]
    ).view(-1, 1, 1)
    iscale = (nmax + ks) / safe  # candidate 0 is the naive nmax / range
    l = ((x - mn) * iscale).round().clamp(0, nmax)  # [K, N, B]
    sw, sx = w.sum(-1), (w * x).sum(-1)
    sl, sl2, sxl = (w * l).sum(-1), (w * l * l).sum(-1), (w * x * l).sum(-1)
    det = sw * sl2 - sl * sl
    ok = det > 0
    scale = torch.where(ok, (sw * sxl - sx * sl) / det.clamp_min(1e-30), torch.zeros_like(det))
    m = torch.where(ok, (sl2 * sx - sl * sxl) / det.clamp_min(1e-30), torch.zeros_like(det))
    pos = m > 0  # a positive min would waste code 0: fix it at 0 and refit the scale
    scale = torch.where(pos, sxl / sl2.clamp_min(1e-30), scale)
    m = torch.where(pos, torch.zeros_like(m), m)
    scale = scale.clamp_min(0)
    err = (w * (scale.unsqueeze(-1) * l + m.unsqueeze(-1) - x) ** 2).sum(-1)
    err = torch.where(ok, err, torch.full_like(err, float("inf")))
    err[0] = torch.where(ok[0], err[0], torch.full_like(err[0], 3e38))  # a flat block keeps the naive candidate
    scale, m = _pick(-err, scale, m)
    flat = rng[:, 0] == 0
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    m = torch.where(flat, mn[:, 0], m)
    return scale.unsqueeze(-1), m.unsqueeze(-1)


def nearest(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted codebook ``values`` for each element of ``x``."""
    values = values.to(x.device)
    mids = (values[1:] + values[:-1]) / 2
    return torch.bucketize(x, mids)


def codebook(x: torch.Tensor, w: torch.Tensor, values: torch.Tensor, ntry: int = 7) -> torch.Tensor:
    """Scale per block (``[N, 1]``) for a non-uniform codebook ``values`` (IQ4_NL's):
    candidates ``(|v_0| + t) / max`` of both signs for ``|t| <= ntry``, each with its
    best fitted scale."""
    values = values.to(x.device)
    mx = signed_absmax(x)
    safe = torch.where(mx == 0, torch.ones_like(mx), mx)
    t = torch.arange(-ntry, ntry + 1, dtype=torch.float32, device=x.device)
    ks = torch.cat([-(t + values[0].abs()), t + values[0].abs()]).view(-1, 1, 1)
    iscale = ks / safe  # [K, N, 1]
    q = values[nearest(values, iscale * x)]
    return _best_scale((w * q * x).sum(-1), (w * q * q).sum(-1), mx)


def error_weights(x: torch.Tensor, importance: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Per-element error weights, llama.cpp's choices.

    With an importance vector (the imatrix: the mean squared input of each column,
    broadcast to ``x``'s shape): ``importance * sqrt(sigma2 + x^2)``, sigma2 the block's
    mean square. Without: ``x^2`` (``"square"``), ``|x|`` (``"abs"``), or
    ``rms + |x|`` (``"rms_abs"``, k-quants' sub-blocks).
    """
    if importance is not None:
        sigma2 = (x * x).mean(-1, keepdim=True)
        return importance * (sigma2 + x * x).sqrt()
    if kind == "square":
        return x * x
    if kind == "abs":
        return x.abs()
    if kind == "rms_abs":
        return (x * x).mean(-1, keepdim=True).sqrt() + x.abs()
    raise ValueError(f"unknown weighting {kind!r}")
