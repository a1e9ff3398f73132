"""Round-to-nearest uniform quantization with per-group scale and zero point."""

from __future__ import annotations

import torch

from ..core.format import Format
from ..core.registry import register
from .quantizer import Quantizer, groups_of


def fp16_round(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 precision: scales and zeros are stored (and costed) as fp16."""
    r = t.to(torch.float16).to(torch.float32)
    return torch.where(torch.isfinite(r) & (r != 0) | (t == 0), r, t)


def quantize_uniform(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize a 2-D weight ``[out, in]`` with groups along ``in``.

    Asymmetric: levels 0..2^b-1 between each group's min and max. Symmetric: levels
    -(2^(b-1)-1)..2^(b-1)-1 scaled by the group's abs-max. Returns a new tensor in
    ``w``'s dtype; computation is in fp32.
    """
    x, _ = groups_of(w, fmt, None, "uniform")
    return _rtn_groups(x, fmt, 1.0).reshape(w.shape).to(w.dtype)


def quantize_none(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The unquantized format: the tensor itself."""
    return w.detach().clone()


UNIFORM = register("quantizer", "uniform")(
    Quantizer(
        "uniform",
        quantize_uniform,
        version="v1",
        params=("outliers",),
        about="round-to-nearest, per-group fp16 scale (and fp16 zero point when asymmetric)",
    )
)
#: the unquantized format is 16 bits: ``{"quantizer": "none", "bits": 3}`` would cost 3.5 bits and store 16
NONE = register("quantizer", "none")(
    Quantizer("none", quantize_none, fixed=(("bits", 16),), about="unquantized (fp16 storage)")
)


#: shrink factors of each group's range the clipping search tries
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))


def quantize_clip(w: torch.Tensor, fmt: Format, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform RTN with each group's range clipped: per group the shrink factor of
    :data:`CLIP_RATIOS` (applied to min and max, or to the absmax) with the least
    importance-weighted squared error. Same layout and cost as ``uniform``."""
    x, imp = groups_of(w, fmt, importance, "clip")
    best, best_err = None, None
    for r in CLIP_RATIOS:
        q = _rtn_groups(x, fmt, r)
        err = ((q - x) ** 2 * imp).sum(-1, keepdim=True)
        if best is None:
            best, best_err = q, err
        else:
            better = err < best_err
            best = torch.where(better, q, best)
            best_err = torch.where(better, err, best_err)
    return best.reshape(w.shape).to(w.dtype)


def _rtn_groups(x: torch.Tensor, fmt: Format, ratio: float) -> torch.Tensor:
    """RTN of groups ``x [.., g]`` with the range shrunk by ``ratio``."""
    if fmt.symmetric:
        qmax = 2 ** (fmt.bits - 1) - 1
        scale = fp16_round(
            torch.where(
                x.abs().amax(-1, keepdim=True) > 0,
                x.abs().amax(-1, keepdim=True) * ratio / qmax,
                torch.ones(1, device=x.device),
            )
        )
        return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
    qmax = 2**fmt.bits - 1
    lo, hi = x.amin(-1, keepdim=True) * ratio, x.amax(-1, keepdim=True) * ratio
    scale = fp16_round(torch.where(hi > lo, (hi - lo) / qmax, torch.ones(1, device=x.device)))
    lo = fp16_round(lo)
    return torch.clamp(torch.round((x - lo) / scale), 0, qmax) * scale + lo


CLIP = register("quantizer", "clip")(
    Quantizer(
        "clip",
        quantize_clip,
        version="v1",
        params=("outliers",),
        uses_importance=True,
        about="round-to-nearest with an importance-weighted clipping search per group; layout and cost as uniform",
    )
)
