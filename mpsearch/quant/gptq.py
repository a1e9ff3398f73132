"""GPTQ for the uniform per-group layout (Frantar et al., 2023): quantize one column at a
time and push each column's error onto the columns not yet quantized, through the
inverse of the layer input's Gram matrix ``H = X^T X / n``.

Same stored layout and cost as ``uniform`` (fp16 scale, and fp16 minimum when
asymmetric, per group), so a GPTQ format swaps for an RTN one at equal size. Options
(format params): ``act_order`` (columns in order of decreasing ``H_ii``; group
parameters are then fixed from the original weights, GPTQModel's ``static_groups``, so
the layout needs no group index), ``damp`` (fraction of the mean diagonal added to
``H``) and ``block`` (columns per lazy batch update) and ``clip`` (default on: each group's range
chosen by the ``clip`` quantizer's importance-weighted search, weighted by ``diag(H)``,
instead of min/max). With min/max ranges GPTQ's error feedback pushes weights past the
range and they clamp: on SmolLM2 at 3 bits that gave ppl 98 against 58 with the search
(``benchmarks/results/quantizers.csv``).

The quantizer needs ``H`` itself: pass it as the importance (``[in, in]``). A search
whose space offers GPTQ formats collects it (the ``gram`` primitive family) over the
calibration windows of the unquantized model, so every tensor is quantized on its own
(no sequential pass through already-quantized layers: the proxy tables need each
(tensor, format) independently); a plan keeps the matrices of its GPTQ tensors.
"""

from __future__ import annotations

import torch

from ..core.format import Format, FormatError
from ..core.registry import register
from .quantizer import Quantizer
from .uniform import CLIP_RATIOS, fp16_round


def _group_params(x: torch.Tensor, fmt: Format, imp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x [out, g]``: (scale, lo) as ``uniform`` stores them (fp16). With
    ``imp`` (the columns' importance), the range shrink of :data:`CLIP_RATIOS` with the
    least importance-weighted rounding error, as the ``clip`` quantizer chooses it."""
    best, best_err = None, None
    for r in CLIP_RATIOS if imp is not None else (1.0,):
        if fmt.symmetric:
            qmax = 2 ** (fmt.bits - 1) - 1
            amax = x.abs().amax(-1, keepdim=True) * r
            params = fp16_round(torch.where(amax > 0, amax / qmax, torch.ones_like(amax))), torch.zeros_like(amax)
        else:
            qmax = 2**fmt.bits - 1
            lo, hi = x.amin(-1, keepdim=True) * r, x.amax(-1, keepdim=True) * r
            params = fp16_round(torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi))), fp16_round(lo)
        if imp is None:
            return params
        err = ((_round(x, *params, fmt) - x) ** 2 * imp).sum(-1, keepdim=True)
        if best is None:
            best, best_err = params, err
        else:
            better = err < best_err
            best = tuple(torch.where(better, new, old) for new, old in zip(params, best))
            best_err = torch.where(better, err, best_err)
    return best


def _round(col: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, fmt: Format) -> torch.Tensor:
    if fmt.symmetric:
        qmax = 2 ** (fmt.bits - 1) - 1
        return torch.clamp(torch.round(col / scale), -qmax, qmax) * scale
    qmax = 2**fmt.bits - 1
    return torch.clamp(torch.round((col - lo) / scale), 0, qmax) * scale + lo


def quantize_gptq(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> torch.Tensor:
    if w.dim() != 2:
        raise FormatError(f"gptq expects a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if not fmt.fits(in_f):
        raise FormatError(f"group size {fmt.group_size} does not divide the input dimension {in_f}")
    if importance is None or importance.shape != (in_f, in_f):
        got = "none" if importance is None else tuple(importance.shape)
        raise FormatError(
            f"gptq needs the layer input's Gram matrix X^T X / n of shape ({in_f}, {in_f}) as its importance, got {got}"
        )
    p = dict(fmt.params)
    act_order, damp, block = bool(p.get("act_order", True)), float(p.get("damp", 0.01)), int(p.get("block", 128))
    clip = bool(p.get("clip", True))
    g = fmt.group_len(in_f)
    W = w.detach().to(torch.float64).clone()
    H = importance.detach().to(device=W.device, dtype=torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    # group parameters: static (from the original weights) with act_order, else set as each group starts
    diag = torch.diag(H).float()
    imp = (lambda j: diag[j : j + g]) if clip else (lambda j: None)
    static = [_group_params(W[:, j : j + g].float(), fmt, imp(j)) for j in range(0, in_f, g)] if act_order else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    # the factorisation in float64, the column sweep in float32 as the reference implementation does (2-3x faster)
    W, Hinv = W.float(), Hinv.float()
    Q = torch.zeros_like(W)
    params = None
    order = perm.tolist()
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1, Err = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, dtype=W.dtype, device=W.device)
        for i in range(i2 - i1):
            col = order[i1 + i]  # the column's original index decides its group
            if act_order:
                params = static[col // g]
            elif col % g == 0:  # as the reference implementation: the group's columns as they stand before this block
                params = _group_params(W[:, i1 + i : i1 + i + g], fmt, imp(col))
            q = _round(W1[:, i : i + 1], *params, fmt).squeeze(1)
            Q[:, i1 + i] = q
            err = (W1[:, i] - q) / Hinv[i1 + i, i1 + i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv[i1 + i, i1 + i : i2].unsqueeze(0)
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
        W[:, i1:i2] = W1
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out.to(w.dtype)


#: the largest ``damp``: beyond it the damped H is the identity times a huge number, and its inverse underflows to NaN
MAX_DAMP = 100.0


def check_gptq_params(p: dict) -> None:
    """``act_order`` and ``clip`` true or false, ``damp`` in (0, MAX_DAMP] (0 leaves a rank-deficient H
    singular), ``block`` a whole number of columns >= 1."""
    for k in ("act_order", "clip"):
        if k in p and not isinstance(p[k], bool):
            raise FormatError(f"gptq: {k} must be true or false, got {p[k]!r}")
    d = p.get("damp", 0.01)
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= MAX_DAMP:
        raise FormatError(
            f"gptq: damp (a fraction of H's mean diagonal) must be a number in (0, {MAX_DAMP:g}], got {d!r}"
        )
    b = p.get("block", 128)
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise FormatError(f"gptq: block (columns per lazy update) must be a whole number >= 1, got {b!r}")


GPTQ = register("quantizer", "gptq")(
    Quantizer(
        "gptq",
        quantize_gptq,
        version="v2",
        params=("act_order", "damp", "block", "clip"),
        uses_importance=True,
        importance_kind="gram",
        check_params=check_gptq_params,
        about="GPTQ (column-wise error feedback through the inverse Gram matrix); layout and cost as uniform",
    )
)
