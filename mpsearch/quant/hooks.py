"""Run-time targets of a plan: hooks that quantize layer inputs and the KV cache as the model runs.

- ``input`` of a layer: a forward pre-hook quantizes the layer's input before its matmul.
- ``k_cache`` / ``v_cache`` on an attention's ``k_proj`` / ``v_proj``: a forward hook
  quantizes the projection's output, so keys are quantized before the rotary embedding
  and whatever the attention stores in its cache (prefill or decode) is the dequantized
  value. A pre-hook on the attention module reads how many tokens its cache already
  holds, so each new token knows its position: positions below the format's ``sinks``
  stay unquantized.

Every site counts its quantization kernel (nonzero elements that round to zero), so
:meth:`RuntimeHooks.kernel_proportions` reports CrossQuant's measure per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.format import Format
from .quantizer import get_quantizer

#: the attention projection each cache target hooks
CACHE_PROJ = {"k_cache": "k_proj", "v_cache": "v_proj"}


def calib_key(module: str, target: str, fmt: Format, name: str) -> str:
    """Where a calibrated tensor of ``fmt`` on ``module``'s ``target`` lives in a plan's calibration."""
    return f"{module}/{target}/{fmt.key}/{name}"


def calib_for(
    calibration: dict[str, torch.Tensor] | None, module: str, target: str, fmt: Format
) -> dict[str, torch.Tensor] | None:
    prefix = f"{module}/{target}/{fmt.key}/"
    out = {k[len(prefix) :]: v for k, v in (calibration or {}).items() if k.startswith(prefix)}
    return out or None


def quantize_site(x: torch.Tensor, fmt: Format, calib, target: str, head_dim: int = 0, start: int = 0) -> torch.Tensor:
    """``x`` (a layer input, or a projection's new keys / values whose first token sits at ``start``)
    quantized in ``fmt``; cache positions below the format's ``sinks`` stay as they are."""
    quantizer = get_quantizer(fmt.quantizer)
    if target == "input":
        return quantizer(x, fmt, calib)
    q = quantizer(x, fmt, calib, head_dim, target)
    keep = int(dict(fmt.params).get("sinks", 0) or 0) - start
    if keep > 0:  # attention sinks: the first tokens stay as computed
        q = torch.cat([x[..., :keep, :], q[..., keep:, :]], dim=-2)
    return q


def attention_of(model: nn.Module, proj: str) -> tuple[str, nn.Module]:
    """The attention module a ``k_proj`` / ``v_proj`` belongs to (its parent), with a ``head_dim``."""
    parent = proj.rpartition(".")[0]
    mod = dict(model.named_modules()).get(parent)
    if mod is None or not isinstance(getattr(mod, "head_dim", None), int):
        raise ValueError(
            f"{proj}: its parent {parent!r} is not an attention module with a head_dim (Llama/Gemma-style)"
        )
    return parent, mod


@dataclass
class RuntimeHooks:
    """Installs the hooks for ``formats[(module, target)]`` on ``model`` (a context manager)."""

    model: nn.Module
    formats: dict[tuple[str, str], Format]
    calibration: dict[str, torch.Tensor] | None = None
    #: per (module, target): [nonzero elements rounded to zero, nonzero elements]
    kernel: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    _handles: list = field(default_factory=list)
    _start: dict[str, int] = field(default_factory=dict)

    def __enter__(self) -> "RuntimeHooks":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def install(self) -> None:
        modules = dict(self.model.named_modules())
        attentions = set()
        for (name, target), fmt in self.formats.items():
            if fmt.is_full:
                continue
            calib = calib_for(self.calibration, name, target, fmt)
            if target == "input":
                self._handles.append(modules[name].register_forward_pre_hook(self._input_hook(name, fmt, calib)))
            else:
                parent, attn = attention_of(self.model, name)
                if parent not in attentions:
                    attentions.add(parent)
                    self._handles.append(
                        attn.register_forward_pre_hook(self._position_hook(parent, attn), with_kwargs=True)
                    )
                self._handles.append(
                    modules[name].register_forward_hook(
                        self._cache_hook(name, target, fmt, calib, parent, attn.head_dim)
                    )
                )

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def kernel_proportions(self) -> dict[tuple[str, str], float]:
        return {k: z / n if n else 0.0 for k, (z, n) in self.kernel.items()}

    # ------------------------------------------------------------- hooks
    def _count(self, site: tuple[str, str], x: torch.Tensor, q: torch.Tensor) -> None:
        from .activation import kernel_counts

        z, n = kernel_counts(x, q)
        acc = self.kernel.setdefault(site, [0, 0])
        acc[0] += z
        acc[1] += n

    def _input_hook(self, name: str, fmt: Format, calib):
        def hook(module, args):
            x = args[0]
            q = quantize_site(x, fmt, calib, "input")
            self._count((name, "input"), x, q)
            return (q, *args[1:])

        return hook

    def _position_hook(self, parent: str, attn: nn.Module):
        def hook(module, args, kwargs):
            cache = next(
                (kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None), None
            )
            self._start[parent] = int(cache.get_seq_length(attn.layer_idx)) if cache is not None else 0

        return hook

    def _cache_hook(self, name: str, target: str, fmt: Format, calib, parent: str, head_dim: int):
        def hook(module, args, out):
            q = quantize_site(out, fmt, calib, target, head_dim, self._start.get(parent, 0))
            self._count((name, target), out, q)
            return q

        return hook
