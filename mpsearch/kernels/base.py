"""What a kernel is, and how one is found: by name, or by the formats and rows it runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..core import registry
from ..core.format import Format


class Kernel(ABC):
    """``pack`` a weight [out, in] for a format; ``run`` a [tokens, in] input through it."""

    name: ClassVar[str]
    #: bump when the layout or the operator changes: profile tables are keyed by it
    version: ClassVar[int] = 1

    @abstractmethod
    def applies(self, fmt: Format, in_features: int, device: str) -> bool:
        """Whether this kernel can run ``fmt`` for rows of ``in_features`` on ``device``."""

    @abstractmethod
    def pack(self, weight: torch.Tensor, fmt: Format) -> dict[str, torch.Tensor]:
        """The stored tensors (codes, scales...) for ``weight`` in ``fmt``."""

    @abstractmethod
    def run(self, x: torch.Tensor, packed: dict[str, torch.Tensor], fmt: Format) -> torch.Tensor:
        """``x @ W.T`` in the input's dtype."""


def kernel_names() -> list[str]:
    return registry.names("kernel")


def get_kernel(name: str) -> Kernel:
    return registry.get("kernel", name)()


def kernels_for(fmt: Format, in_features: int, device: str = "cpu") -> list[str]:
    """Every kernel that can run ``fmt`` (an unquantized format runs ``dense`` only)."""
    return [k for k in kernel_names() if get_kernel(k).applies(fmt, in_features, device)]
