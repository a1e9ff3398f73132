"""Primitives: what proxies are built from, computed once per model + data + settings.

Primitives come in families (:mod:`.gradients`, :mod:`.activations`, :mod:`.hessian`,
:mod:`.synflow`), each one pass over the calibration tokens. Only the families a
proxy needs are computed; each is cached on disk as safetensors under the cache
folder, keyed by the weights, the tokens, the tensors and the family's settings,
written atomically and checked on load (a corrupt or incomplete file is named and
recomputed, never silently used; NaN is an error that names the tensor). The measured
KL per (tensor, format) lives in :mod:`.sensitivity` because it depends on the formats.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core import registry
from ..core.device import device_parts, model_device
from ..store.cache import cache_dir, content_key, load_tensors, remove, save_tensors, tokens_hash
from .base import Checkpoint, Family, PrimitiveError, PrimitiveSettings, Values

log = logging.getLogger(__name__)

__all__ = [
    "Checkpoint",
    "Family",
    "PrimitiveError",
    "PrimitiveSettings",
    "Primitives",
    "compute_primitives",
    "families",
    "family_of",
    "primitive_names",
    "tokens_hash",
    "weights_hash",
]


def families() -> dict[str, Family]:
    """Every registered primitive family by name."""
    return {n: registry.get("primitive family", n) for n in registry.names("primitive family")}


def primitive_names() -> frozenset[str]:
    """Every primitive a family provides."""
    return frozenset(p for f in families().values() for p in f.provides)


def family_of(primitive: str) -> Family:
    for f in families().values():
        if primitive in f.provides:
            return f
    raise KeyError(
        f"no primitive family provides {primitive!r}; known primitives: {', '.join(sorted(primitive_names()))}"
    )


@dataclass
class Primitives:
    """Per-tensor arrays by primitive name; ``key`` identifies model + data + settings of
    what is loaded, ``weights`` the model's parameter values."""

    key: str
    weights: str = ""
    values: Values = field(default_factory=dict)
    #: cache key of each family computed (a proxy table is keyed by the families its proxy reads)
    family_keys: dict[str, str] = field(default_factory=dict)
    #: cache key of the measured KL in ``kl`` ("" when not computed)
    kl_key: str = ""
    #: measured KL when only that tensor is quantized, keyed by (tensor, format key)
    kl: dict[tuple[str, str], float] = field(default_factory=dict)
    #: the device type the values were computed on ("cpu" leaves every key as it was; see :mod:`mpsearch.core.device`)
    device: str = "cpu"

    def get(self, primitive: str, tensor: str) -> torch.Tensor:
        if primitive not in self.values:
            raise KeyError(
                f"primitive {primitive!r} was not computed (computed: {', '.join(sorted(self.values)) or 'none'})"
            )
        if tensor not in self.values[primitive]:
            raise KeyError(f"primitive {primitive!r} was not computed for {tensor}")
        return self.values[primitive][tensor]

    def key_for(self, needs: set[str] | frozenset[str]) -> str:
        """The part of the key that a value reading only ``needs`` depends on (not the other families)."""
        fams = sorted({family_of(n).name for n in needs if n in primitive_names()})
        missing = [f for f in fams if f not in self.family_keys]
        if missing:
            raise KeyError(f"primitive families {missing} were not computed")
        if "kl" in needs and not self.kl_key:
            raise KeyError("measured KL was not computed")
        return content_key(
            self.weights,
            [self.family_keys[f] for f in fams],
            self.kl_key if "kl" in needs else "",
            *device_parts(self.device),
        )

    @property
    def fisher(self) -> dict[str, torch.Tensor]:
        return self.values.get("fisher", {})

    @property
    def xtx(self) -> dict[str, torch.Tensor]:
        return self.values.get("xtx", {})

    @property
    def gram(self) -> dict[str, torch.Tensor]:
        return self.values.get("gram", {})


#: config keys that do not change a model's outputs (where it was loaded from, what saved it;
#: dtype is in the parameters' bytes already)
_NOT_IDENTITY = frozenset({"name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"})


def weights_hash(model: nn.Module) -> str:
    """Hash of every parameter's values, dtype and shape, and of the model's config (the
    fingerprint only covers names and shapes).

    Cache keys use it as the model's identity: two checkpoints of one architecture, or
    one checkpoint under two configs (RoPE base, norm epsilon), never share an entry.
    """
    h = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _NOT_IDENTITY}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)};".encode())
        h.update(p.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes() if p.numel() else b"")
    return h.hexdigest()


def compute_primitives(
    model: nn.Module,
    tensors: list[str],
    tokens: torch.Tensor,
    needs: set[str] | frozenset[str],
    use_cache: bool = True,
    progress: bool = True,
    settings: PrimitiveSettings | None = None,
    stages=None,
    refresh: bool = False,
    checkpoint_every: float = 30.0,
) -> Primitives:
    """The primitives in ``needs`` (other names are ignored) for ``tensors``, by family, cached by content.

    ``stages`` (a :class:`mpsearch.core.profiling.Stages`) records each family's time and memory;
    ``refresh`` recomputes the families and overwrites their cache entries. With the
    cache on, resumable families save their running state at most every
    ``checkpoint_every`` seconds, and a rerun after a kill resumes at the next sequence.
    The passes run on the model's device; the values come back (and are cached) on the CPU, and
    off the CPU the keys carry the device type, so a GPU value never answers a CPU run.
    """
    settings = settings or PrimitiveSettings()
    weights = weights_hash(model)
    device = model_device(model)
    base = content_key(weights, tokens_hash(tokens), sorted(tensors), "prims-v2", *device_parts(device))
    wanted = [f for f in families().values() if set(f.provides) & set(needs)]
    keys = {f.name: content_key(base, f.name, f.version, {s: getattr(settings, s) for s in f.settings}) for f in wanted}
    prims = Primitives(
        key=content_key(base, sorted(keys.items())), weights=weights, family_keys=keys, device=device.type
    )
    for fam in wanted:
        path = cache_dir() / "primitives" / f"{fam.name}-{keys[fam.name]}.safetensors"
        values = _load(path, keys[fam.name], fam, tensors) if use_cache and not refresh else None
        if values is None:
            partial = path.with_name(path.name.replace(".safetensors", ".partial.safetensors"))
            extra = {}
            if use_cache and fam.resumable:
                if refresh:
                    remove(partial)
                extra["checkpoint"] = Checkpoint(partial, keys[fam.name], every=checkpoint_every)
            with stages(f"primitives: {fam.name}") if stages is not None else contextlib.nullcontext():
                values = fam.compute(model, tensors, tokens, settings, progress, **extra)
            values = {
                name: {t: v.cpu() for t, v in per.items()} for name, per in values.items()
            }  # cached values live on the CPU
            _check_finite(fam, values)
            if use_cache:
                _save(path, values, keys[fam.name])
                remove(partial)
        prims.values.update(values)
    return prims


def _check_finite(fam: Family, values: Values) -> None:
    for name in fam.provides:
        for tensor, t in values[name].items():
            if not torch.isfinite(t).all():
                raise PrimitiveError(
                    f"{name} statistics of {tensor} contain NaN or inf (check the model and calibration data)"
                )


def _save(path: Path, values: Values, key: str) -> None:
    save_tensors(path, {f"{name}::{tensor}": t for name, per in values.items() for tensor, t in per.items()}, key)


def _load(path: Path, key: str, fam: Family, tensors: list[str]) -> Values | None:
    """Read a cache entry; a corrupt, incomplete or non-finite one is reported, removed and recomputed."""
    from ..store.cache import discard

    state = load_tensors(path, key)
    if state is None:
        return None
    out: Values = {name: {} for name in fam.provides}
    for k, t in state.items():
        name, _, tensor = k.partition("::")
        if name not in out:
            discard(path, f"unexpected entry {k!r}")
            return None
        out[name][tensor] = t
    if any(set(per) != set(tensors) for per in out.values()):
        discard(path, "incomplete: it does not cover every tensor and primitive of its family")
        return None
    try:
        _check_finite(fam, out)
    except PrimitiveError as e:
        discard(path, str(e))
        return None
    return out
