"""What a primitive family is: one pass over the calibration data that yields named arrays.

A family (gradients, activations, hessian, synflow) computes several primitives at
once because they share the pass; each family is cached on its own, so asking for a
new primitive never recomputes the others. A new family is one file that registers a
:class:`Family` under ``("primitive family", name)``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

#: primitive name -> {tensor name -> array}; scalars per tensor are 0-d tensors
Values = dict[str, dict[str, torch.Tensor]]


class PrimitiveError(RuntimeError):
    """Primitives that are missing, corrupt, or contain NaN/inf."""


@dataclass(frozen=True)
class PrimitiveSettings:
    """Knobs of the expensive primitives; part of the cache key of the families that read them."""

    #: Hutchinson probes per calibration sequence (each sequence is one gradient graph)
    hessian_probes: int = 2
    #: calibration sequences the Hessian is estimated on (0 = all)
    hessian_sequences: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hessian_probes < 1:
            raise ValueError(f"hessian_probes must be >= 1, got {self.hessian_probes}")
        if self.hessian_sequences < 0:
            raise ValueError(f"hessian_sequences must be >= 0, got {self.hessian_sequences}")


@dataclass
class Checkpoint:
    """Where a family's pass keeps its running state, so a killed run resumes at the next sequence.

    A family calls :meth:`resume` once before its loop and :meth:`save` after each
    sequence. Saves are at least ``every`` seconds apart (0: after every sequence), so
    a run loses at most that much work and large states (the Fisher pass holds two
    copies of the weights) are not rewritten every second. The file is a checked cache
    entry under the family's own key; the driver removes it once the family is cached.
    """

    path: Path
    key: str
    every: float = 30.0
    _last: float = field(default_factory=time.monotonic, repr=False)

    def resume(self) -> tuple[int, dict[str, torch.Tensor], dict]:
        """``(sequences done, saved tensors, saved extras)``; ``(0, {}, {})`` when nothing usable is saved."""
        from ..store.cache import load_tensors_and_metadata

        got = load_tensors_and_metadata(self.path, self.key)
        if got is None:
            return 0, {}, {}
        state, meta = got
        done = int(meta.get("done", 0))
        log.info("resuming %s after %d finished sequences", self.path.name, done)
        return done, state, json.loads(meta.get("extra", "{}"))

    def save(
        self, done: int, state: Callable[[], dict[str, torch.Tensor]], extra: dict | None = None, force: bool = False
    ) -> None:
        """Save the state after ``done`` sequences, if ``every`` seconds have passed since the last save."""
        from ..store.cache import save_tensors

        if not force and time.monotonic() - self._last < self.every:
            return
        save_tensors(self.path, state(), self.key, {"done": str(done), "extra": json.dumps(extra or {})})
        self._last = time.monotonic()

    def clear(self) -> None:
        from ..store.cache import remove

        remove(self.path)


Compute = Callable[..., Values]


@dataclass(frozen=True)
class Family:
    """``compute(model, tensors, tokens, settings, progress)`` returns every name in ``provides``.

    A family whose pass is long takes ``checkpoint=`` (a :class:`Checkpoint`) too and says
    so with ``resumable=True``: a killed run then resumes at its next sequence."""

    name: str
    provides: tuple[str, ...]
    compute: Compute
    #: bump when the computation changes, so old cache entries are not reused
    version: str = "v1"
    #: the :class:`PrimitiveSettings` fields that change the result
    settings: tuple[str, ...] = ()
    #: one line for ``mpsearch list`` and the docs
    about: str = ""
    #: ``compute`` accepts ``checkpoint=`` and resumes from it
    resumable: bool = False
