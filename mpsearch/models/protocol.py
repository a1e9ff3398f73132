"""What a model's own data must provide, written down and checked before any heavy work.

A packaged LM reads text (:mod:`mpsearch.models.data`). Any other model, or your own LM,
brings its data as an object with this shape::

    class MyData:
        name = "my-dataset"                                  # recorded in every plan
        def calibration(self, chunks: int, skip: int = 0) -> Batches: ...
        def evaluation(self, chunks: int) -> Batches: ...

``calibration(chunks, skip)`` is ``chunks`` batches after the first ``skip`` (the search
takes the calibration batches, then GPTQ's Gram batches, then a refinement slice after
them); ``evaluation(chunks)`` is held-out data. Both return :class:`~mpsearch.models.batches.Batches`:
:class:`~mpsearch.models.batches.TokenBatches` for a causal LM,
:class:`~mpsearch.models.batches.LabelledBatches` for a classifier.

:class:`BatchData` is that object for batches you already have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .batches import Batches, LabelledBatches, TokenBatches, as_batches
from .data import DataError


@runtime_checkable
class ModelData(Protocol):
    """The data a model brings: named calibration and evaluation batches."""

    name: str

    def calibration(self, chunks: int, skip: int = 0) -> Batches: ...

    def evaluation(self, chunks: int) -> Batches: ...


@dataclass
class BatchData:
    """Batches you already have, as :class:`ModelData`.

    ``calibration``: the batches the statistics are computed on (the search reads the first
    ``calib_chunks``, and more after them for GPTQ and refinement when it needs them);
    ``evaluation``: held-out batches, measured whole (``eval_chunks`` does not apply).
    A token tensor ``[n, T]`` is taken as ``n`` windows of a causal LM.
    """

    calibration_batches: Batches | torch.Tensor
    evaluation_batches: Batches | torch.Tensor
    name: str = "user data"

    def __post_init__(self) -> None:
        self.calibration_batches = as_batches(self.calibration_batches)
        self.evaluation_batches = as_batches(self.evaluation_batches)

    def calibration(self, chunks: int, skip: int = 0) -> Batches:
        have = len(self.calibration_batches)
        if skip + chunks > have:
            raise DataError(
                f"data {self.name!r} has {have} calibration batches; the search asks for {chunks} after the first "
                f"{skip}: pass more calibration batches, or fewer calib_chunks / gram_chunks / refine_chunks"
            )
        return part(self.calibration_batches, skip, chunks)

    def evaluation(self, chunks: int) -> Batches:
        return self.evaluation_batches


def part(batches: Batches, skip: int, count: int) -> Batches:
    """Batches ``skip`` to ``skip + count`` of ``batches``."""
    if isinstance(batches, TokenBatches):
        return TokenBatches(batches.tokens[skip : skip + count])
    if isinstance(batches, LabelledBatches):
        s, n = skip * batches.batch_size, count * batches.batch_size
        return LabelledBatches(batches.x[s : s + n], batches.y[s : s + n], batches.batch_size)
    if skip == 0:
        return batches.head(count)
    raise TypeError(f"cannot take batches {skip}..{skip + count} of a {type(batches).__name__}; give BatchData more")


def check_data(data: object, model: nn.Module) -> None:
    """Fail in a second, naming what is wrong, when ``data`` is not :class:`ModelData` or ``model`` cannot run it.

    Runs ``model`` on the first calibration batch: a shape or dtype mismatch shows here, not
    after minutes of statistics."""
    missing = [n for n in ("calibration", "evaluation") if not callable(getattr(data, n, None))]
    if not hasattr(data, "name"):
        missing.insert(0, "name")
    if missing:
        raise TypeError(
            f"data of type {type(data).__name__} lacks {', '.join(missing)}: a model's own data needs `name` (a str), "
            "`calibration(chunks, skip=0)` and `evaluation(chunks)` returning Batches (see mpsearch.models.protocol; "
            "BatchData wraps batches you already have)"
        )
    if not isinstance(data.name, str) or not data.name:
        raise TypeError(f"data.name must be a non-empty str (it is recorded in every plan), got {data.name!r}")
    first = data.calibration(1)
    if not isinstance(first, Batches) or len(first) < 1:
        raise TypeError(
            f"data {data.name!r}: calibration(1) returned {type(first).__name__}, not Batches with at least one batch "
            "(TokenBatches for a causal LM, LabelledBatches for a classifier)"
        )
    held_out = data.evaluation(1)
    if type(held_out) is not type(first):
        raise TypeError(
            f"data {data.name!r}: evaluation(1) returned {type(held_out).__name__}, calibration(1) "
            f"{type(first).__name__}; both must be the same kind of Batches"
        )
    try:
        with torch.no_grad():
            first.forward(model, 0)
    except Exception as e:
        raise ValueError(
            f"the model cannot run the first calibration batch of data {data.name!r}: {type(e).__name__}: {e}"
        ) from e
