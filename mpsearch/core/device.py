"""Where the model computes: ``--device cpu|cuda|cuda:N|auto``.

One flag for every command that runs a model, checked in two steps: the spelling when
a config is built (:func:`check_device_spec`, no torch call, so a typo fails in a
second), and whether such a device exists when a session opens (:func:`resolve_device`),
still before any heavy work.

What runs on the device: every forward and backward pass (primitives, measured KL,
evaluation, task accuracy), the quantizers and the proxy tables. What stays on the CPU:
the token windows (moved to the model's device where a pass uses them), the cache (its
values are CPU tensors, so they hash and save the same whoever computed them) and
everything the allocators read. On the CPU nothing changes: results and cache keys are
the same as before this module existed. Elsewhere values may differ by float rounding,
so the keys of computed values carry the device type (:func:`device_parts`) and a cache
never serves a GPU value to a CPU run, or the other way round.
"""

from __future__ import annotations

import re

import torch

#: what ``--device`` takes
DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "auto")
_SPEC = re.compile(r"cpu|auto|cuda(:\d+)?")


def check_device_spec(spec: str) -> str:
    """``spec`` if it is one of :data:`DEVICE_CHOICES` (spelling only: a config may be
    written on one machine and opened on another, so no device is looked for here)."""
    if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
        raise ValueError(
            f"--device {spec!r} is not a device; choose one of {', '.join(DEVICE_CHOICES)} "
            "(auto: cuda when available, else cpu)"
        )
    return spec


def resolve_device(spec: str) -> torch.device:
    """The device ``spec`` names on this machine. ``auto`` is cuda when torch sees a GPU,
    else cpu; asking for cuda where there is none is an error that says what to do,
    not a silent fall back to the CPU (a run meant for a GPU would take hours there)."""
    check_device_spec(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {spec}: no CUDA device is available here (torch.cuda.is_available() is False); "
            "use --device cpu or --device auto"
        )
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1}); use one of them, or --device cuda"
        )
    return device


def exact_fp32(device) -> None:
    """On CUDA, keep fp32 convolutions in fp32. cuDNN rounds them through TF32 (a 10-bit
    mantissa) by default, which moves a conv net's KL by more than the differences between
    plans the search ranks. Matmuls are full fp32 by default, and left as the user set them."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = False


def model_device(model) -> torch.device:
    """Where ``model``'s parameters live: the device its inputs must be moved to. CPU for a
    model without parameters, or a stand-in that is not a module."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def to_model(t: torch.Tensor, model) -> torch.Tensor:
    """``t`` on ``model``'s device (the tensor itself when it is there already, as on the CPU)."""
    return t.to(model_device(model))


def device_parts(where) -> tuple[str, ...]:
    """What a cache key of a computed value adds for the device it was computed on: nothing on
    the CPU (so every key, and every existing cache entry, stays as it was), ``("device:cuda",)``
    elsewhere. ``where`` is a model, a :class:`torch.device` or a device string."""
    if isinstance(where, (str, torch.device)):
        kind = torch.device(where).type
    else:
        kind = model_device(where).type
    return () if kind == "cpu" else (f"device:{kind}",)
