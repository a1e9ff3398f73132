"""Activation quantizers for the ``input`` target: what a layer's input becomes before its matmul.

Each works on ``x [tokens, channels]`` (any leading shape is flattened to tokens) and is
symmetric, as int8 GEMM kernels take activations:

- ``tok``: per-token dynamic absmax (a scale per token, computed on the fly);
- ``tensor``: per-tensor static scale, calibrated offline (the 99.99th percentile of
  ``|x|`` on calibration data), values outside it clip;
- ``cross``: CrossQuant's row x column scaling, ``s_ij = t_i^a * c_j^(1-a) / qmax`` with
  ``t_i`` the token's absmax and ``c_j`` the channel's absmax over the tokens of the call
  (CrossQuant computes both on the activation matrix), never below the channel's absmax on
  calibration data, so a single decode token does not get a scale per element;
  ``a = alpha`` (default 0.15). ``alpha = 1`` is per-token. Since ``c_j >= |x_ij|``, no
  element clips;
- ``adalog``: a sign-magnitude log quantizer for power-law activations (post-softmax,
  GELU/SiLU products): levels ``m * base^-k`` below each token's absmax ``m``, with the
  base searched per tensor on calibration data (AdaLog's adaptive base).

The quantization kernel of CrossQuant's analysis is the set of nonzero elements that
round to zero; :func:`kernel_counts` counts it, and the run-time hooks report its share
per layer (:mod:`mpsearch.quant.hooks`).
"""

from __future__ import annotations

import math

import torch

from ..core.format import Format, FormatError
from ..core.registry import register
from .quantizer import TargetQuantizer

#: calibration keeps at most this many token rows per target (a random subset), to bound memory
MAX_ROWS = 8192
#: the static per-tensor scale is this quantile of |x|: robust to a single spike
STATIC_QUANTILE = 0.9999
#: log bases AdaLog searches (the base of the levels m * base^-k)
ADALOG_BASES = tuple(round(1.2 + 0.1 * i, 2) for i in range(19))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float32)


def _qmax(fmt: Format) -> int:
    return 2 ** (fmt.bits - 1) - 1


def _round_scaled(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    scale = scale.clamp_min(1e-12)
    return (x / scale).round().clamp(-qmax, qmax) * scale


def quantize_token(x: torch.Tensor, fmt: Format, calib=None) -> torch.Tensor:
    r = _rows(x)
    q = _round_scaled(r, r.abs().amax(-1, keepdim=True) / _qmax(fmt), _qmax(fmt))
    return q.reshape(x.shape).to(x.dtype)


def quantize_tensor(x: torch.Tensor, fmt: Format, calib) -> torch.Tensor:
    q = _round_scaled(_rows(x), calib["absmax"].to(x.device) / _qmax(fmt), _qmax(fmt))
    return q.reshape(x.shape).to(x.dtype)


def calibrate_tensor(x: torch.Tensor, g, fmt: Format) -> dict[str, torch.Tensor]:
    a = _rows(x).abs().reshape(-1)
    if a.numel() > 2**24:  # torch.quantile's limit
        a = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))[: 2**24]]
    return {"absmax": torch.quantile(a, STATIC_QUANTILE).reshape(1)}


def _alpha(fmt: Format) -> float:
    return float(dict(fmt.params).get("alpha", 0.15))


def quantize_cross(x: torch.Tensor, fmt: Format, calib) -> torch.Tensor:
    r = _rows(x)
    a = _alpha(fmt)
    t = r.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    # the calibrated channel maxima, raised where this call's tokens exceed them: t_i^a c_j^(1-a) >= |x_ij| then, so
    # nothing clips
    c = torch.maximum(calib["channel_absmax"].to(r.device).reshape(1, -1), r.abs().amax(0, keepdim=True)).clamp_min(
        1e-12
    )
    q = _round_scaled(r, t.pow(a) * c.pow(1 - a) / _qmax(fmt), _qmax(fmt))
    return q.reshape(x.shape).to(x.dtype)


def calibrate_cross(x: torch.Tensor, g, fmt: Format) -> dict[str, torch.Tensor]:
    return {"channel_absmax": _rows(x).abs().amax(0)}


def _check_cross(fmt: Format) -> None:
    a = dict(fmt.params).get("alpha", 0.15)
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
        raise FormatError(f"cross: alpha must be a number in [0, 1], got {a!r}")


def _log_levels(r: torch.Tensor, bits: int, base: float) -> torch.Tensor:
    m = r.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    kmax = 2 ** (bits - 1) - 2  # bits-1 magnitude bits: levels k = 0..kmax, the last code is zero
    k = (-(r.abs().clamp_min(1e-30) / m).log() / math.log(base)).round()
    q = m * torch.pow(base, -k.clamp(0, kmax))
    return torch.where((k > kmax) | (r == 0), torch.zeros_like(r), r.sign() * q)


def quantize_adalog(x: torch.Tensor, fmt: Format, calib) -> torch.Tensor:
    return _log_levels(_rows(x), fmt.bits, float(calib["base"])).reshape(x.shape).to(x.dtype)


def calibrate_adalog(x: torch.Tensor, g, fmt: Format) -> dict[str, torch.Tensor]:
    """The base with the least squared error on the calibration rows (AdaLog's base search)."""
    r = _rows(x)
    errs = [float(((_log_levels(r, fmt.bits, b) - r) ** 2).sum()) for b in ADALOG_BASES]
    return {"base": torch.tensor([ADALOG_BASES[int(torch.tensor(errs).argmin())]])}


def kernel_counts(x: torch.Tensor, q: torch.Tensor) -> tuple[int, int]:
    """``(nonzero elements rounded to zero, nonzero elements)``: the quantization kernel and its base."""
    nz = x != 0
    return int((nz & (q == 0)).sum()), int(nz.sum())


class _ActQuantizer(TargetQuantizer):
    """Symmetric (a sign and at least one magnitude bit, so 2 bits or more); only the bits vary."""

    def check(self, fmt: Format) -> None:
        super().check(fmt)
        if self.name == "cross":
            _check_cross(fmt)


TOKEN = register("quantizer", "tok")(
    _ActQuantizer("tok", quantize_token, about="activations: per-token dynamic absmax, symmetric")
)
TENSOR = register("quantizer", "tensor")(
    _ActQuantizer(
        "tensor",
        quantize_tensor,
        calibrate=calibrate_tensor,
        about="activations: per-tensor static scale (calibrated), symmetric",
    )
)
CROSS = register("quantizer", "cross")(
    _ActQuantizer(
        "cross",
        quantize_cross,
        params=("alpha",),
        calibrate=calibrate_cross,
        about="activations: CrossQuant, token absmax^alpha x calibrated channel absmax^(1-alpha)",
    )
)
ADALOG = register("quantizer", "adalog")(
    _ActQuantizer(
        "adalog",
        quantize_adalog,
        calibrate=calibrate_adalog,
        about="activations: log2-style levels with a calibrated base (AdaLog)",
    )
)
