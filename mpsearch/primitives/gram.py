"""The Gram matrix of every decision layer's input, ``gram = X^T X / n`` (``[in, in]``).

GPTQ reads the whole matrix (its column-by-column error feedback runs through the
inverse), and the ``oerr`` proxy value (``trace(dW gram dW^T)``, the layer's mean
squared output error) does too. A family of its own because it is large (about 0.5 GB
for SmolLM2-135M's 210 block linears) and only those two need it: the activations
family keeps only the diagonal.

The diagonal is accumulated in float64 exactly as the activations family's ``xtx``, so
``gram.diagonal()`` equals ``xtx`` bit for bit and a format that reads only the
columns' importance quantizes the same from either.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.registry import register
from .activations import input_pass
from .base import Checkpoint, Family, PrimitiveSettings, Values


class _GramStats:
    def __init__(self, dim: int, device=None) -> None:
        self.xtx = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.diag = torch.zeros(dim, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x64 = x.double()
        self.xtx += x.T @ x
        self.diag += (x64 * x64).sum(0)
        self.tokens += x.shape[0]

    def state(self) -> dict[str, torch.Tensor]:
        return {"xtx": self.xtx, "diag": self.diag, "tokens": self.tokens}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device=None) -> "_GramStats":
        s = cls(state["diag"].numel(), device)
        s.xtx, s.diag, s.tokens = (state[k].to(device).clone() for k in ("xtx", "diag", "tokens"))
        return s

    def finish(self) -> torch.Tensor:
        n = float(self.tokens)
        g = self.xtx / n
        g.diagonal().copy_((self.diag / n).float())
        return g


def gram(
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
        _GramStats,
        lambda x: x,
        _GramStats.from_state,
        "Gram matrices (X^T X)",
        progress,
        checkpoint,
    )
    finished = {t: stats[t].finish() for t in tensors if t not in alias}
    return {"gram": {t: finished[alias[t]].clone() if t in alias else finished[t] for t in tensors}}


FAMILY = register("primitive family", "gram")(
    Family(
        "gram",
        ("gram",),
        gram,
        resumable=True,
        about="each layer input's Gram matrix X^T X / n, for GPTQ and the output-error proxy value oerr",
    )
)
