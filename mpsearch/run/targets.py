"""Run-time decisions: each layer input and each layer's K and V cache, with what they cost and
what quantizing them does to the model.

A space's ``[input]`` table makes one decision per weight decision: its members share one
input (q/k/v read the same hidden state, gate/up too), so one format is set on all of
them. Its ``[kv_cache]`` table makes two per attention layer, ``k_cache`` on ``k_proj`` and
``v_cache`` on ``v_proj``.

Per (decision, format) :func:`runtime_table` measures, all cached by content:

- ``kl``: the KL of the model's output with only that site quantized, on the same
  calibration slice and with the same tail re-run as the weights' measured KL;
- ``fisher``: ``sum g^2 dx^2`` over the site's tokens and channels, ``g`` the loss gradient
  at the site, mean over calibration windows (the weights' Fisher is the same mean);
- ``mse``: ``sum dx^2``, the same way; ``kernel``: the share of nonzero elements rounded to zero.

Proxies over these live in ``proxies/runtime/`` (expressions over ``kl``, ``fisher``,
``mse``, ``kernel``, ``bits``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.device import device_parts, to_model
from ..core.files import shipped
from ..core.format import Format
from ..core.plan import importance_digest
from ..core.space import Decision, SearchSpace
from ..proxies.proxy import Proxy, ProxyFileError
from ..quant import format_identity, get_quantizer
from ..quant.hooks import CACHE_PROJ, RuntimeHooks, attention_of, calib_for, quantize_site
from ..quant.kvcache import storage_bits
from ..store.cache import cache_dir, content_key, read_json, remove, require, require_finite, tokens_hash, write_json

RUNTIME_NAMES = frozenset({"kl", "fisher", "mse", "kernel", "bits"})
SCHEMA = "runtime-sensitivity/v1"
#: measured-KL pairs between saves of the partial result
SAVE_EVERY = 50


@dataclass(frozen=True)
class RuntimeDecision:
    """One run-time choice: ``target`` of ``modules`` (all set to one format), read at ``site``."""

    name: str
    target: str
    modules: tuple[str, ...]
    formats: tuple[Format, ...]
    #: elements per token: the input width, or the cache width (kv heads x head_dim)
    width: int
    head_dim: int = 0
    #: multiply-accumulates per token that read this input (weights of all its modules)
    macs: int = 0

    @property
    def site(self) -> tuple[str, str]:
        return self.modules[0], self.target

    def cache_bytes(self, j: int, context: int, batch: int = 1) -> float:
        """Bytes of this cache in format ``j`` holding ``context`` tokens for each of ``batch`` sequences (0 for
        inputs)."""
        if self.target == "input":
            return 0.0
        return batch * storage_bits(self.formats[j], self.target, context, self.width, self.head_dim) / 8.0


def runtime_decisions(space: SearchSpace, model: nn.Module, weights: list[Decision]) -> list[RuntimeDecision]:
    """The space's ``[input]`` and ``[kv_cache]`` decisions for ``model``."""
    out: list[RuntimeDecision] = []
    inp = space.runtime_target("input")
    if inp is not None:
        for d in weights:
            out.append(
                RuntimeDecision(
                    f"input:{d.name}",
                    "input",
                    tuple(m.name for m in d.members),
                    tuple(inp.candidates()),
                    d.members[0].in_features,
                    macs=sum(m.numel for m in d.members),
                )
            )
    kv = space.runtime_target("kv_cache")
    if kv is not None:
        modules = dict(model.named_modules())
        for target, proj in CACHE_PROJ.items():
            names = [n for n in modules if n.rpartition(".")[2] == proj]
            if not names:
                raise ValueError(
                    f"search space {space.name!r} has a [kv_cache] table, but the model has no attention {proj} modules"
                )
            for n in names:
                _, attn = attention_of(model, n)
                width = modules[n].weight.shape[0]
                fmts = tuple(
                    f
                    for f in kv.candidates()
                    if f.is_full or get_quantizer(f.quantizer).fits_width(f, width, attn.head_dim)
                )
                out.append(RuntimeDecision(f"{target}:{n}", target, (n,), fmts, width, attn.head_dim))
    return out


def runtime_proxy_names() -> list[str]:
    return sorted(p.stem for p in shipped("proxies", "runtime").glob("*.toml"))


#: the run-time proxy in the same units as a weight proxy (``auto``)
PAIRED = {"measured_kl": "kl", "fisher": "fisher", "mse": "mse"}


def runtime_proxy(cfg) -> str:
    """``cfg.runtime_proxy``; ``auto`` pairs it with the first weight proxy (measured_kl -> kl, fisher -> fisher)."""
    return PAIRED.get(cfg.proxies[0], "kl") if cfg.runtime_proxy == "auto" else cfg.runtime_proxy


def load_runtime_proxy(spec: str) -> Proxy:
    """A proxy over run-time primitives: a built-in name in ``proxies/runtime/`` or a TOML file."""
    path = Path(spec)
    if not os.path.lexists(path):
        path = shipped("proxies", "runtime", f"{spec}.toml")
        if not path.is_file():
            raise ProxyFileError(f"no run-time proxy file or built-in {spec!r}; built-in: {runtime_proxy_names()}")
    try:
        return Proxy.from_file(path, RUNTIME_NAMES)
    except ProxyFileError as e:
        raise ProxyFileError(f"run-time {e} (names: {sorted(RUNTIME_NAMES)})") from None


def runtime_losses(table: pd.DataFrame, decisions: list[RuntimeDecision], proxy: Proxy) -> list[np.ndarray]:
    """Per decision, the proxy's predicted loss of each format (from :func:`runtime_table`)."""
    rows = table.set_index(["decision", "format"])
    out = []
    for d in decisions:
        vals = []
        for f in d.formats:
            r = rows.loc[(d.name, f.key)]
            v = float(proxy.evaluate({k: math.nan if r[k] is None else float(r[k]) for k in proxy.needs}))
            if not math.isfinite(v):
                raise ValueError(
                    f"run-time proxy {proxy.name!r} gives {v} for {d.name} in {f.key}; it reads {sorted(proxy.needs)} "
                    "(kl is measured only for a proxy that reads it)"
                )
            vals.append(v)
        out.append(np.array(vals, dtype=np.float64))
    return out


def runtime_table(
    model: nn.Module,
    decisions: list[RuntimeDecision],
    calib: torch.Tensor,
    kl_tokens: torch.Tensor,
    calibration: dict[str, torch.Tensor],
    weights_key: str,
    use_cache: bool = True,
    progress: bool = True,
    measure_kl: bool = True,
) -> pd.DataFrame:
    """``decision, target, format, kl, fisher, mse, kernel, bits`` for every run-time decision and format.

    ``measure_kl=False`` skips the measured-KL pass (the slow one; ``kl`` is then NaN), for a
    proxy that does not read it. Cached by the weights, both token sets, every format's identity,
    the calibration tensors and whether KL was measured."""
    pairs = [(d, f) for d in decisions for f in d.formats]
    key = content_key(
        weights_key,
        tokens_hash(calib),
        tokens_hash(kl_tokens),
        SCHEMA,
        [(d.name, d.modules, format_identity(f)) for d, f in pairs],
        importance_digest(calibration),
        *(() if measure_kl else ("no-kl",)),
        *device_parts(model),
    )
    path = cache_dir() / "sensitivity" / f"runtime-{key}.json"
    if use_cache:
        rows = read_json(path, key, SCHEMA, lambda v: _check(v, len(pairs), measure_kl))
        if rows is not None:
            return pd.DataFrame(rows)
    stats = _fisher_mse(model, pairs, calib, calibration, progress)
    partial = path.with_name(f"runtime-{key}.partial.json") if use_cache else None
    kl = (
        _measured_kl(model, pairs, kl_tokens, calibration, progress, partial, key)
        if measure_kl
        else [float("nan")] * len(pairs)
    )
    rows = [
        {"decision": d.name, "target": d.target, "format": f.key, "kl": kl[i], **stats[i], "bits": float(f.bits)}
        for i, (d, f) in enumerate(pairs)
    ]
    if use_cache:
        write_json(
            path,
            [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows],
            key,
            SCHEMA,
        )
    return pd.DataFrame(rows)


def _check(rows, n: int, measure_kl: bool = True) -> None:
    require(isinstance(rows, list) and len(rows) == n, f"expected {n} rows")
    cols = ("kl", "fisher", "mse", "kernel") if measure_kl else ("fisher", "mse", "kernel")
    require_finite([r[k] for r in rows for k in cols], "a run-time sensitivity")


def _fisher_mse(model: nn.Module, pairs, calib: torch.Tensor, calibration, progress: bool) -> list[dict]:
    """One forward + backward per calibration window; at every site, each format's error is
    weighted by the squared gradient there (the backward starts at the input embeddings)."""
    from ..quant.activation import kernel_counts

    acc = [{"fisher": 0.0, "mse": 0.0, "zeros": 0, "nonzero": 0} for _ in pairs]
    by_site: dict[tuple[str, str], list[int]] = {}
    for i, (d, f) in enumerate(pairs):
        by_site.setdefault(d.site, []).append(i)
    modules = dict(model.named_modules())

    def quantized(i: int, x: torch.Tensor) -> torch.Tensor:
        d, f = pairs[i]
        return (
            x
            if f.is_full
            else quantize_site(x, f, calib_for(calibration, d.modules[0], d.target, f), d.target, d.head_dim)
        )

    def watch(site):
        def record(x: torch.Tensor) -> None:
            x = x.detach()
            for i in by_site[site]:
                q = quantized(i, x)
                z, n = kernel_counts(x, q)
                acc[i]["zeros"] += z
                acc[i]["nonzero"] += n
                acc[i]["mse"] += float(((q - x).float() ** 2).sum())

            def on_grad(
                g: torch.Tensor,
            ) -> None:  # quantize again here rather than hold every format's error until backward
                g2 = g.float() ** 2
                for i in by_site[site]:
                    acc[i]["fisher"] += float((g2 * (quantized(i, x) - x).float() ** 2).sum())

            return on_grad

        def pre(m, args):
            args[0].register_hook(record(args[0]))

        def post(m, args, out):
            out.register_hook(record(out))

        return pre if site[1] == "input" else post

    handles = []
    for site in by_site:
        m = modules[site[0]]
        h = watch(site)
        handles.append(m.register_forward_pre_hook(h) if site[1] == "input" else m.register_forward_hook(h))
    try:
        for ids in tqdm(calib, desc="run-time sensitivities (fisher, mse)", disable=not progress, unit="window"):
            ids = to_model(ids.reshape(1, -1), model)
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            with torch.enable_grad():
                model(inputs_embeds=emb, labels=ids, use_cache=False).loss.backward()
    finally:
        for h in handles:
            h.remove()
    n = len(calib)
    return [
        {"fisher": a["fisher"] / n, "mse": a["mse"] / n, "kernel": a["zeros"] / a["nonzero"] if a["nonzero"] else 0.0}
        for a in acc
    ]


def _measured_kl(
    model: nn.Module,
    pairs,
    tokens: torch.Tensor,
    calibration,
    progress: bool,
    partial: Path | None = None,
    key: str = "",
) -> list[float]:
    """KL with one site quantized at a time, re-running the decoder from that site's layer on.
    Saved to ``partial`` every :data:`SAVE_EVERY` pairs, so an interrupted pass resumes there."""
    from ..primitives.sensitivity import Reference, layer_of, tail_runner

    done = (
        (read_json(partial, key, SCHEMA + "-partial", lambda v: require_finite(v, "a partial KL")) or [])
        if partial
        else []
    )
    out = list(done[: len(pairs)])
    if len(out) == len(pairs):
        return out
    tail, ref_logp = tail_runner(model, tokens)
    ref = Reference(ref_logp)
    with torch.no_grad():
        for i, (d, f) in enumerate(
            tqdm(
                pairs[len(out) :],
                desc="run-time measured KL",
                disable=not progress,
                unit="pair",
                initial=len(out),
                total=len(pairs),
            ),
            start=len(out),
        ):
            if f.is_full:
                out.append(0.0)
            else:
                with RuntimeHooks(model, {(m, d.target): f for m in d.modules}, calibration):
                    out.append(max(0.0, ref.kl(tail(layer_of(d.modules[0])))))
            if partial is not None and (i + 1) % SAVE_EVERY == 0:
                write_json(partial, out, key, SCHEMA + "-partial")
    if partial is not None:
        remove(partial)
    return out


def kv_fp16_bytes(decisions: list[RuntimeDecision], context: int, batch: int = 1) -> float:
    """The fp16 KV cache at ``context`` tokens: what a memory budget's KV share starts from."""
    return sum(batch * context * d.width * 2.0 for d in decisions if d.target != "input")


def mean_act_bits(decisions: list[RuntimeDecision], choice: dict[str, Format]) -> float:
    """MAC-weighted mean activation bits of the inputs (16 where unquantized)."""
    ins = [d for d in decisions if d.target == "input"]
    total = sum(d.macs for d in ins)
    return sum(d.macs * choice[d.name].bits for d in ins) / total if total else math.nan
