"""Evaluate a proxy on every (tensor, format): the table ``D[tensor, format]``."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.layers import matrix
from ..core.space import Decision
from ..primitives import Primitives, primitive_names
from ..primitives.activations import KERNEL_BITS
from ..quant import quantize
from ..store.cache import require, require_finite
from .proxy import Proxy

log = logging.getLogger(__name__)


COLUMNS = ["decision", "tensor", "format", "option", "bits", "numel", "qerr", "predicted", "predicted_se"]


def proxy_tables(
    proxies: list[Proxy],
    model: nn.Module,
    decisions: list[Decision],
    prims: Primitives,
    progress: bool = True,
    importance: dict[str, torch.Tensor] | None = None,
) -> dict[str, pd.DataFrame]:
    """Every proxy's table in one sweep: each (tensor, format) is quantized once, whatever the number of proxies.

    A table has one row per (decision member, candidate format): the columns decision,
    tensor, format, option (index into the decision's formats), bits (effective),
    numel, qerr (sum of dW^2; ``oerr`` = trace(dW gram dW^T) for proxies that read it), predicted (the proxy's value)
    and predicted_se (its standard error where it reads a Hutchinson estimate, else 0). ``dW`` is each format's
    real error: quantizers that weight their search by ``importance`` get it.
    """
    importance = importance or {}
    modules = dict(model.named_modules())
    needs = frozenset().union(*(p.needs for p in proxies))
    if "htrace" in needs:
        needs = needs | {"htrace_se"}  # the Hutchinson standard error, carried into predicted_se
    rows: dict[str, list] = {p.name: [] for p in proxies}
    total = sum(len(d.members) * len(d.formats) for d in decisions)
    names = ", ".join(p.name for p in proxies)
    bar = tqdm(
        total=total,
        desc=f"proxy {names}" if len(names) < 40 else f"{len(proxies)} proxies",
        disable=not progress,
        unit="pair",
    )
    for d in decisions:
        for m in d.members:
            w = matrix(modules[m.name]).detach().float()
            base = {"w": w, "numel": float(m.numel)}
            # the primitives (kept on the CPU) meet the weights on the model's device
            base.update({name: prims.get(name, m.name).to(w.device) for name in needs & primitive_names()})
            for j, fmt in enumerate(d.formats):
                dw = quantize(w, fmt, importance.get(m.name)) - w
                qerr = float((dw.double() ** 2).sum())
                env = {**base, "dw": dw, "qerr": qerr, "bits": fmt.effective_bits(m.in_features)}
                if "oerr" in needs:
                    dw64 = dw.double()
                    env["oerr"] = float(((dw64 @ prims.get("gram", m.name).to(dw64.device).double()) * dw64).sum())
                if "kernel" in env:
                    env["kernel"] = _kernel_at(base["kernel"], fmt)
                if "kl" in needs:
                    if (m.name, fmt.key) not in prims.kl:
                        raise KeyError(f"measured KL was not computed for {m.name} in format {fmt.key}")
                    env["kl"] = prims.kl[(m.name, fmt.key)]
                for p in proxies:
                    value = p.evaluate(env)
                    if not np.isfinite(value):
                        raise ValueError(f"proxy {p.name!r} gives {value} for {m.name} in format {fmt.key}")
                    rows[p.name].append(
                        (d.name, m.name, fmt.key, j, env["bits"], m.numel, qerr, value, _standard_error(p, env, value))
                    )
                bar.update()
    bar.close()
    return {name: pd.DataFrame(r, columns=COLUMNS) for name, r in rows.items()}


def _standard_error(proxy: Proxy, env: dict, value: float) -> float:
    """The proxy's standard error from the Hutchinson trace's (first order: the change of the
    value when ``htrace`` moves by one standard error); 0 for proxies that read no estimate."""
    if "htrace" not in proxy.needs:
        return 0.0
    return abs(proxy.evaluate({**env, "htrace": env["htrace"] + env["htrace_se"]}) - value)


def proxy_table(
    proxy: Proxy, model: nn.Module, decisions: list[Decision], prims: Primitives, progress: bool = True
) -> pd.DataFrame:
    """One proxy's table (see :func:`proxy_tables`)."""
    return proxy_tables([proxy], model, decisions, prims, progress)[proxy.name]


def check_table(table: pd.DataFrame, decisions: list[Decision]) -> None:
    """A cached table must be exactly the table these decisions give: every row, every column, finite values."""
    require(list(table.columns) == COLUMNS, f"columns {list(table.columns)}, expected {COLUMNS}")
    expected = [(d.name, m.name, f.key, j) for d in decisions for m in d.members for j, f in enumerate(d.formats)]
    require(len(table) == len(expected), f"{len(table)} rows, expected {len(expected)}: incomplete")
    got = list(zip(table["decision"], table["tensor"], table["format"], table["option"]))
    require(got == expected, "its rows are not this search space's (tensor, format) pairs")
    for col in ("bits", "numel", "qerr", "predicted", "predicted_se"):
        require_finite(table[col].tolist(), f"column {col}")


def decision_losses(table: pd.DataFrame, decisions: list[Decision]) -> list[np.ndarray]:
    """Sum the members' predictions per decision option (tied tensors add up)."""
    sums = table.groupby(["decision", "option"])["predicted"].sum()
    return [np.array([sums[(d.name, j)] for j in range(len(d.formats))], dtype=np.float64) for d in decisions]


def _kernel_at(kernel: torch.Tensor, fmt) -> torch.Tensor:
    """The quantization-kernel entry for the format's bits (activations quantized like the weights)."""
    i = fmt.bits - KERNEL_BITS[0]
    if not 0 <= i < kernel.numel():
        raise ValueError(
            f"the quantization kernel covers {KERNEL_BITS[0]}-{KERNEL_BITS[-1]} bits, not format {fmt.key}"
        )
    return kernel[i]
