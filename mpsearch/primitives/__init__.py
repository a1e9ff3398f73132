"""Primitives: what proxies are built from, computed once per model + data + settings.

Cached on disk as safetensors under the cache folder, keyed by the model fingerprint,
the calibration tokens and the settings; written atomically, checked on load (a
corrupt or foreign file is named and recomputed, never silently used). The
quantization error of every (tensor, format) is a table; ``dw`` itself is recomputed
on demand because RTN is deterministic and storing every candidate would be GBs.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..cache import atomic_path, cache_dir, content_key
from .calibration import calibrate

log = logging.getLogger(__name__)
CALIBRATED = ("fisher", "xtx")


class PrimitiveError(RuntimeError):
    """Primitives that are missing, corrupt, or contain NaN/inf."""


@dataclass
class Primitives:
    """Per-tensor arrays keyed by module name; ``key`` identifies model + data + settings,
    ``weights`` the model's parameter values."""

    key: str
    weights: str = ""
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    xtx: dict[str, torch.Tensor] = field(default_factory=dict)
    #: measured KL when only that tensor is quantized, keyed by (tensor, format key)
    kl: dict[tuple[str, str], float] = field(default_factory=dict)

    def check_finite(self) -> None:
        for kind in CALIBRATED:
            for name, t in getattr(self, kind).items():
                if not torch.isfinite(t).all():
                    raise PrimitiveError(f"{kind} statistics of {name} contain NaN or inf (check the model and calibration data)")


def tokens_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


def weights_hash(model: nn.Module) -> str:
    """Hash of every parameter's values (the fingerprint only covers names and shapes).

    Cache keys use it so two checkpoints of one architecture never share an entry.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if p.numel() else b"")
    return h.hexdigest()


def compute_primitives(
    model: nn.Module,
    tensors: list[str],
    tokens: torch.Tensor,
    needs: set[str] | frozenset[str],
    use_cache: bool = True,
    progress: bool = True,
) -> Primitives:
    """Fisher and/or ``xtx`` for ``tensors`` if a proxy ``needs`` them; cached by content."""
    want = [k for k in CALIBRATED if k in needs]
    weights = weights_hash(model)
    key = content_key(weights, tokens_hash(tokens), sorted(tensors), "calib-v1")
    prims = Primitives(key=key, weights=weights)
    if not want:
        return prims
    path = cache_dir() / "primitives" / f"{key}.safetensors"
    if use_cache and path.exists():
        loaded = _load(path, tensors)
        if loaded is not None:
            prims.fisher, prims.xtx = loaded
            prims.check_finite()
            return prims
    fisher, xtx = calibrate(model, tensors, tokens, fisher=True, xtx=True, progress=progress)
    prims.fisher, prims.xtx = fisher, xtx
    prims.check_finite()
    if use_cache:
        _save(path, prims)
    return prims


def _save(path: Path, prims: Primitives) -> None:
    from safetensors.torch import save_file

    state = {f"{kind}::{name}": t.contiguous() for kind in CALIBRATED for name, t in getattr(prims, kind).items()}
    tmp = atomic_path(path)
    save_file(state, str(tmp), metadata={"key": prims.key})
    os.replace(tmp, path)


def _load(path: Path, tensors: list[str]) -> tuple[dict, dict] | None:
    """Read a cache entry; a corrupt or incomplete one is reported and ignored."""
    from safetensors import safe_open

    try:
        out: tuple[dict, dict] = ({}, {})
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                kind, name = k.split("::", 1)
                out[CALIBRATED.index(kind)][name] = f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a cache miss
        log.warning("primitive cache %s is unreadable (%s); recomputing", path, e)
        return None
    if any(set(d) != set(tensors) for d in out):
        log.warning("primitive cache %s is incomplete; recomputing", path)
        return None
    return out
