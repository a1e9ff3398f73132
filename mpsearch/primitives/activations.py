"""Activation primitives: statistics of every decision layer's input, one forward pass.

Per decision tensor (all over the calibration tokens):

- ``xtx``: ``diag(X^T X) / n`` (GPTQ's Hessian diagonal up to a factor);
- ``hinv``: ``diag((X^T X / n + damp I)^-1)``, with GPTQ's damping of 1% of the mean
  diagonal. GPTQ's (and BAQ's) loss of quantizing column ``j`` alone is
  ``||dW[:, j]||^2 / hinv[j]``: the error left after the other columns compensate;
- ``act_entropy``: Shannon entropy (nats) of each token's activation mass
  ``|x| / sum |x|``, averaged over tokens; low when a few channels dominate (outliers).
  Q-VLM uses activation entropy to predict how much a layer's error propagates;
- ``act_absmax``: the largest ``|x|``;
- ``act_kurtosis``: kurtosis of all input elements (3 for a Gaussian; heavy tails above);
- ``act_outlier``: fraction of elements with ``|x|`` above 6x their token's RMS;
- ``kernel``: CrossQuant's quantization kernel, the fraction of elements that symmetric
  per-token round-to-nearest at ``b`` bits sends to zero (``|x| < absmax / (2^(b-1)-1) / 2``),
  for ``b = 2..16`` (index ``b - 2``); a proxy reads the entry of its format's bits.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.device import model_device
from ..core.layers import input_rows, matrix_shape, weight_modules
from ..core.registry import register
from ..models.batches import as_batches
from .base import Checkpoint, Family, PrimitiveSettings, Values

KERNEL_BITS = tuple(range(2, 17))
GPTQ_DAMP = 0.01
OUTLIER_RMS = 6.0


def _contribution(x: torch.Tensor) -> dict:
    """What one call's input ``x`` (``[tokens, dim]`` float32) adds to the running sums."""
    x64 = x.double()
    a = x.abs()
    ratio = a / a.amax(1, keepdim=True).clamp_min(1e-30)
    p = a / a.sum(1, keepdim=True).clamp_min(1e-30)
    rms = x.pow(2).mean(1, keepdim=True).sqrt()
    return {
        "xtx": x.T @ x,
        "diag": (x64 * x64).sum(0),
        "moments": torch.stack([(x64**k).sum() for k in range(1, 5)]),
        "absmax": float(a.max()),
        "entropy": float(torch.special.entr(p).sum(1).double().sum()),
        "outliers": int((a > OUTLIER_RMS * rms).sum()),
        # exact counts, on x's device (no host round trip per bit width)
        "kernel": torch.stack([(ratio < 0.5 / (2 ** (b - 1) - 1)).sum() for b in KERNEL_BITS]).to(torch.float64),
        "tokens": x.shape[0],
    }


class _Stats:
    """Running sums for one layer's input, on the device its inputs are (the CPU by default)."""

    def __init__(self, dim: int, device=None) -> None:
        self.xtx = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.diag = torch.zeros(dim, dtype=torch.float64, device=device)
        self.moments = torch.zeros(4, dtype=torch.float64, device=device)
        self.absmax = 0.0
        self.entropy = 0.0
        self.outliers = 0
        self.kernel = torch.zeros(len(KERNEL_BITS), dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, c: dict) -> None:
        self.xtx += c["xtx"]
        self.diag += c["diag"]
        self.moments += c["moments"]
        self.absmax = max(self.absmax, c["absmax"])
        self.entropy += c["entropy"]
        self.outliers += c["outliers"]
        self.kernel += c["kernel"]
        self.tokens += c["tokens"]

    SCALARS = ("absmax", "entropy", "outliers", "tokens")
    TENSORS = ("xtx", "diag", "moments", "kernel")

    def state(self) -> dict[str, torch.Tensor]:
        """Every running sum as a tensor (for a checkpoint)."""
        return {
            **{k: getattr(self, k) for k in self.TENSORS},
            **{k: torch.tensor(getattr(self, k), dtype=torch.float64) for k in self.SCALARS},
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device=None) -> "_Stats":
        s = cls(state["diag"].numel(), device)
        for k in cls.TENSORS:
            setattr(s, k, state[k].to(device).clone())
        s.absmax, s.entropy = float(state["absmax"]), float(state["entropy"])
        s.outliers, s.tokens = int(state["outliers"]), int(state["tokens"])
        return s

    def finish(self) -> dict[str, torch.Tensor]:
        n, dim = self.tokens, self.diag.numel()
        elems = n * dim
        mu, m2, m3, m4 = (self.moments / elems).tolist()
        var = m2 - mu * mu
        central4 = m4 - 4 * mu * m3 + 6 * mu * mu * m2 - 3 * mu**4
        return {
            "xtx": (self.diag / n).float(),
            "hinv": _damped_inverse_diag(self.xtx.double() / n),
            "act_entropy": _scalar(self.entropy / n),
            "act_absmax": _scalar(self.absmax),
            "act_kurtosis": _scalar(central4 / var**2 if var > 0 else 0.0),
            "act_outlier": _scalar(self.outliers / elems),
            "kernel": (self.kernel / elems).float(),
        }


def _scalar(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def _damped_inverse_diag(h: torch.Tensor) -> torch.Tensor:
    """``diag((H + damp I)^-1)`` the way GPTQ prepares H: dead columns get 1 on the diagonal."""
    h = h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(GPTQ_DAMP * float(h.diagonal().mean()))
    chol = torch.linalg.cholesky(h)
    return torch.cholesky_inverse(chol).diagonal().float()


def input_pass(
    model: nn.Module,
    tensors: list[str],
    tokens: torch.Tensor,
    new: Callable[[int], Any],
    contribution: Callable[[torch.Tensor], dict],
    from_state: Callable[[dict], Any],
    desc: str,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Running statistics of every listed layer's input (as the rows its weight matrix multiplies) over ``tokens``, one
    forward pass.

    ``new(dim, device)`` makes a layer's statistics (with ``add(contribution)`` and ``state()``),
    ``contribution(x)`` is what one call's input adds, ``from_state(state, device)`` restores a
    checkpoint; the statistics live on the model's device, as the inputs do. Layers that share an input (q/k/v, gate/up)
    are computed once; every
    tensor gets its own copy of the result (safetensors refuses shared memory).
    """
    modules = weight_modules(model, tensors)
    data = as_batches(tokens)
    device = model_device(model)
    start, saved, extra = checkpoint.resume() if checkpoint else (0, {}, {})
    per: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in saved.items():
        t, _, field_ = k.partition("::")
        per.setdefault(t, {})[field_] = v
    stats = {t: from_state(st, device) for t, st in per.items()}
    #: tensor -> the tensor whose input it shares (q/k/v, gate/up): statistics computed once
    alias: dict[str, str] = dict(extra.get("alias", {}))
    last: list = [None, None]  # the previous hook's input object and tensor

    def hook_for(t: str):
        def hook(mod, args, out):
            x = args[0]
            if last[0] is x:
                if alias.setdefault(t, last[1]) != last[1]:
                    raise RuntimeError(f"{t} changed which layer it shares its input with between sequences")
                return
            if t in alias:
                raise RuntimeError(f"{t} stopped sharing its input with {alias[t]}")
            last[0], last[1] = x, t
            stats.setdefault(t, new(matrix_shape(modules[t])[1], device)).add(
                contribution(input_rows(modules[t], x.detach()).float())
            )

        return hook

    handles = [modules[t].register_forward_hook(hook_for(t)) for t in tensors]
    try:
        with torch.no_grad():
            bar = tqdm(total=len(data), initial=start, desc=desc, disable=not progress, unit="batch")
            for i in range(start, len(data)):
                data.forward(model, i)
                last[0] = last[1] = None
                bar.update()
                if checkpoint and i + 1 < len(data):
                    checkpoint.save(
                        i + 1,
                        lambda: {f"{t}::{k}": v for t, s in stats.items() for k, v in s.state().items()},
                        {"alias": alias},
                    )
            bar.close()
    finally:
        for h in handles:
            h.remove()
    return {t: stats[alias.get(t, t)] for t in tensors}, alias


def activations(
    model: nn.Module,
    tensors: list[str],
    tokens: torch.Tensor,
    settings: PrimitiveSettings | None = None,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
) -> Values:
    stats, alias = input_pass(
        model,
        tensors,
        tokens,
        _Stats,
        _contribution,
        _Stats.from_state,
        "activations (x^T x, entropy, kurtosis, kernel)",
        progress,
        checkpoint,
    )
    finished = {t: stats[t].finish() for t in tensors if t not in alias}
    out: Values = {}
    for t in tensors:
        for name, value in finished[alias.get(t, t)].items():
            out.setdefault(name, {})[t] = value.clone() if t in alias else value  # safetensors refuses shared memory
    return out


FAMILY = register("primitive family", "activations")(
    Family(
        "activations",
        ("xtx", "hinv", "act_entropy", "act_absmax", "act_kurtosis", "act_outlier", "kernel"),
        activations,
        resumable=True,
        about="layer-input statistics: diag and damped inverse of X^T X, entropy, abs-max, kurtosis, outliers, "
        "quantization kernel",
    )
)
