"""What a search caches between runs, and how: proxy tables, offline calibrations, and the
measurements of plans (their keys and the checks an entry passes before it is served).

The algorithms compute (:func:`mpsearch.proxies.table.proxy_tables`,
:func:`mpsearch.quant.calibrate.calibrate`) and read or write nothing; the orchestration
decides what is cached, under which key, and checks every entry on read
(:mod:`mpsearch.store.cache`), so a changed input never gets an old value.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import torch
from torch import nn

from ..core.device import device_parts
from ..core.format import Format
from ..core.plan import Plan, importance_digest
from ..core.space import Decision
from ..primitives import Primitives
from ..proxies.proxy import Proxy
from ..proxies.table import check_table, proxy_tables
from ..quant import format_identity, get_quantizer
from ..quant.calibrate import ROWS_PER_WINDOW, calibrate, calibration_sites
from ..store.cache import (
    cache_dir,
    content_key,
    read_entry,
    read_frame,
    require,
    require_finite,
    tokens_hash,
    write_entry,
    write_frame,
)

TABLE_SCHEMA = "proxy-table/v3"  # v3: predicted_se
CALIBRATION_SCHEMA = "calibration/v1"


def table_key(
    proxy: Proxy, decisions: list[Decision], prims: Primitives, importance: dict[str, torch.Tensor] | None = None
) -> str:
    """A table depends on the weights, the primitives *its own* proxy reads, its expression,
    every decision's members and formats (quantizer versions included), and the importance
    vectors the formats' quantizers read; not on which other proxies ran beside it."""
    layout = [(d.name, [m.name for m in d.members], [format_identity(f) for f in d.formats]) for d in decisions]
    parts = [prims.key_for(proxy.needs), proxy.expression.text, layout, TABLE_SCHEMA]
    used = {
        m.name: importance[m.name]
        for d in decisions
        for m in d.members
        if importance
        and m.name in importance
        and any(get_quantizer(f.quantizer).reads_importance(f) for f in d.formats)
    }
    if used:
        parts.append(importance_digest(used))
    return content_key(*parts)


def cached_proxy_tables(
    proxies: list[Proxy],
    model: nn.Module,
    decisions: list[Decision],
    prims: Primitives,
    use_cache: bool = True,
    progress: bool = True,
    importance: dict[str, torch.Tensor] | None = None,
) -> dict[str, pd.DataFrame]:
    """:func:`proxy_tables`, each cached by its own :func:`table_key` and checked on read
    (:func:`check_table`); the ones not cached are computed together."""
    if len({p.name for p in proxies}) != len(proxies):
        raise ValueError(f"two proxies share a name: {[p.name for p in proxies]}")
    keys = {p.name: table_key(p, decisions, prims, importance) for p in proxies}
    paths = {name: cache_dir() / "tables" / f"{key}.csv" for name, key in keys.items()}
    out: dict[str, pd.DataFrame] = {}
    if use_cache:
        for p in proxies:
            table = read_frame(paths[p.name], keys[p.name], TABLE_SCHEMA, lambda t: check_table(t, decisions))
            if table is not None:
                out[p.name] = table
    todo = [p for p in proxies if p.name not in out]
    if todo:
        for name, table in proxy_tables(todo, model, decisions, prims, progress, importance).items():
            out[name] = table
            if use_cache:
                write_frame(paths[name], table, keys[name], TABLE_SCHEMA)
    return {p.name: out[p.name] for p in proxies}


def cached_proxy_table(
    proxy: Proxy,
    model: nn.Module,
    decisions: list[Decision],
    prims: Primitives,
    use_cache: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """One proxy's cached table (see :func:`cached_proxy_tables`)."""
    return cached_proxy_tables([proxy], model, decisions, prims, use_cache, progress)[proxy.name]


def cached_calibration(
    model: nn.Module,
    formats: dict[tuple[str, str], list[Format]],
    tokens: torch.Tensor,
    weights_key: str,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """:func:`mpsearch.quant.calibrate.calibrate`, cached by the weights (``weights_key``, their hash),
    tokens, sites, format identities and seed; a checked entry, a bad one recomputed, never served."""
    from safetensors.torch import load, save

    todo = calibration_sites(formats)
    if not todo:
        return {}
    key = content_key(
        weights_key,
        tokens_hash(tokens),
        seed,
        ROWS_PER_WINDOW,
        CALIBRATION_SCHEMA,
        sorted((n, t, [format_identity(f) for f in fmts]) for (n, t), fmts in todo.items()),
        *device_parts(model),
    )
    path = cache_dir() / "calibration" / f"{key}.bin"
    body = read_entry(path, key, CALIBRATION_SCHEMA)
    if body is not None:
        return load(body)
    out = calibrate(model, formats, tokens, progress, seed)
    write_entry(path, save({k: v.contiguous().clone() for k, v in out.items()}), key, CALIBRATION_SCHEMA)
    return out


EVAL_SCHEMA = "evaluation/v2"  # v2: KL summed a slice of positions at a time


def check_quality(q: dict, tokens: int) -> None:
    """A measurement has finite ppl, KL and NLL over exactly the evaluation's target tokens."""
    require(
        isinstance(q, dict) and {"ppl", "kl", "nll", "eval_tokens"} <= set(q), "missing ppl, kl, nll or eval_tokens"
    )
    require_finite([q["ppl"], q["kl"], q["nll"]], "the measurement")
    require(q["eval_tokens"] == tokens, f"measured on {q['eval_tokens']} tokens, the evaluation has {tokens}")
    if "kl_windows" in q:  # per-window values (bootstrap CIs): one per window, finite, averaging to the totals' scale
        require(
            isinstance(q["kl_windows"], list) and len(q["kl_windows"]) == len(q.get("nll_windows", [])) > 0,
            "bad per-window values",
        )
        require_finite(q["kl_windows"] + q["nll_windows"], "a per-window value")


def check_tasks(q: dict) -> None:
    for k in ("cloze_acc", "mc_acc", "mc_acc_norm"):
        require(isinstance(q.get(k), (int, float)) and 0 <= q[k] <= 1, f"{k} is {q.get(k)!r}, not an accuracy")


def plan_hash(plan: Plan) -> str:
    """The formats of a plan, with the version of every quantizer they use, the
    importance vectors the quantizers that read one get, and its calibration tensors."""
    used = {n for n, f in plan.weight_formats().items() if get_quantizer(f.quantizer).reads_importance(f)}
    imp = {n: t for n, t in (plan.importance or {}).items() if n in used}
    formats = {
        n: {t: [f.to_dict(), format_identity(f)] for t, f in e.items() if f} for n, e in sorted(plan.tensors.items())
    }
    body = {"tensors": formats, "importance": importance_digest(imp)} if imp else formats
    if plan.calibration:  # run-time formats calibrated offline: their values depend on these tensors
        body = {"plan": body, "calibration": importance_digest(plan.calibration)}
    body = json.dumps(body, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:20]
