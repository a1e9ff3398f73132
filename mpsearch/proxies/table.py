"""Evaluate a proxy on every (tensor, format): the table ``D[tensor, format]``."""
from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..cache import atomic_path, cache_dir, content_key
from ..primitives import Primitives
from ..quant import quantize
from ..space import Decision
from .proxy import Proxy

log = logging.getLogger(__name__)


def proxy_table(proxy: Proxy, model: nn.Module, decisions: list[Decision], prims: Primitives, progress: bool = True) -> pd.DataFrame:
    """One row per (decision member, candidate format): predicted loss and the raw error.

    Columns: decision, tensor, format, option (index into the decision's formats),
    bits (effective), numel, qerr (sum of dW^2), predicted (the proxy's value).
    """
    modules = dict(model.named_modules())
    rows = []
    total = sum(len(d.members) * len(d.formats) for d in decisions)
    bar = tqdm(total=total, desc=f"proxy {proxy.name}", disable=not progress, unit="pair")
    for d in decisions:
        for m in d.members:
            w = modules[m.name].weight.detach().float()
            base = {"w": w, "numel": float(m.numel)}
            if "fisher" in proxy.needs:
                base["fisher"] = _need(prims.fisher, m.name, "fisher")
            if "xtx" in proxy.needs:
                base["xtx"] = _need(prims.xtx, m.name, "xtx")
            for j, fmt in enumerate(d.formats):
                dw = quantize(w, fmt) - w
                qerr = float((dw.double() ** 2).sum())
                env = {**base, "dw": dw, "qerr": qerr, "bits": fmt.effective_bits(m.in_features)}
                if "kl" in proxy.needs:
                    if (m.name, fmt.key) not in prims.kl:
                        raise KeyError(f"measured KL was not computed for {m.name} in format {fmt.key}")
                    env["kl"] = prims.kl[(m.name, fmt.key)]
                value = proxy.evaluate(env)
                if not np.isfinite(value):
                    raise ValueError(f"proxy {proxy.name!r} gives {value} for {m.name} in format {fmt.key}")
                rows.append((d.name, m.name, fmt.key, j, env["bits"], m.numel, qerr, value))
                bar.update()
    bar.close()
    return pd.DataFrame(rows, columns=["decision", "tensor", "format", "option", "bits", "numel", "qerr", "predicted"])


def cached_proxy_table(proxy: Proxy, model: nn.Module, decisions: list[Decision], prims: Primitives, use_cache: bool = True, progress: bool = True) -> pd.DataFrame:
    """:func:`proxy_table`, cached by primitives key + expression + the decisions' formats."""
    key = content_key(prims.key, proxy.expression.text, [(d.name, [f.key for f in d.formats]) for d in decisions], "table-v1")
    path = cache_dir() / "tables" / f"{key}.csv"
    if use_cache and path.exists():
        try:
            return pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            log.warning("proxy table cache %s is corrupt (%s); recomputing", path, e)
    table = proxy_table(proxy, model, decisions, prims, progress)
    if use_cache:
        tmp = atomic_path(path)
        table.to_csv(tmp, index=False)
        os.replace(tmp, path)
    return table


def decision_losses(table: pd.DataFrame, decisions: list[Decision]) -> list[np.ndarray]:
    """Sum the members' predictions per decision option (tied tensors add up)."""
    sums = table.groupby(["decision", "option"])["predicted"].sum()
    return [np.array([sums[(d.name, j)] for j in range(len(d.formats))], dtype=np.float64) for d in decisions]


def _need(store: dict[str, torch.Tensor], name: str, kind: str) -> torch.Tensor:
    if name not in store:
        raise KeyError(f"primitive {kind!r} was not computed for {name}")
    return store[name]
