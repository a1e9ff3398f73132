"""Offline calibration of run-time formats: static activation scales, KVQuant's per-channel
key ranges and Fisher-weighted codebooks.

One pass over calibration windows records, at every site that needs it, a subset of the
tensor's token rows and, where a format weights its fit by sensitivity (KVQuant's nuq),
the loss gradient of those rows. The gradients come from a backward pass that starts at
the input embeddings, so no weight gets a gradient. The result is a flat dict of tensors
under :func:`mpsearch.quant.hooks.calib_key` names: a plan stores it beside its JSON.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.device import to_model
from ..core.format import Format
from .hooks import attention_of, calib_key
from .quantizer import get_quantizer

#: token rows kept per calibration window and site (a seeded random subset): 256 x 8 windows x 120
#: input sites of SmolLM2 hold 0.7 GB
ROWS_PER_WINDOW = 256


def needs_calibration(fmt: Format, target: str | None = None) -> bool:
    """Whether ``fmt`` on ``target`` (None: on any target) reads tensors fitted offline."""
    q = get_quantizer(fmt.quantizer)
    return hasattr(q, "needs_calibration") and q.needs_calibration(fmt, target)


def calibration_sites(formats: dict[tuple[str, str], list[Format]]) -> dict[tuple[str, str], list[Format]]:
    """The sites of ``formats`` with a format that reads tensors fitted offline, and those formats."""
    todo = {site: [f for f in fmts if needs_calibration(f, site[1])] for site, fmts in formats.items()}
    return {site: fmts for site, fmts in todo.items() if fmts}


def calibrate(
    model: nn.Module,
    formats: dict[tuple[str, str], list[Format]],
    tokens: torch.Tensor,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Calibrated tensors for every ``(module, target)`` and each of its formats that needs them.

    ``tokens`` are calibration windows ``[n, T]`` (token ids of a causal LM). A search caches
    the result (:func:`mpsearch.run.cached.cached_calibration`); this function reads and writes nothing.
    """
    todo = calibration_sites(formats)
    if not todo:
        return {}
    wants = {site for site, fmts in todo.items() if any(get_quantizer(f.quantizer).wants_grads for f in fmts)}
    grads = bool(wants)
    rows: dict[tuple[str, str], list[torch.Tensor]] = {s: [] for s in todo}
    grad_rows: dict[tuple[str, str], list[torch.Tensor]] = {s: [] for s in todo}
    positions: dict[tuple[str, str], list[torch.Tensor]] = {s: [] for s in todo}
    gen = torch.Generator().manual_seed(seed)
    pick: list[torch.Tensor] = []
    modules = dict(model.named_modules())

    def record(
        site, x: torch.Tensor
    ) -> None:  # the kept rows go to the CPU: the fits run there, and the result is saved
        r = x.reshape(-1, x.shape[-1])
        rows[site].append(r[pick[0].to(r.device)].detach().float().clone().cpu())
        positions[site].append(pick[0] % x.shape[-2])
        if site in wants and x.requires_grad:  # only sites whose formats weight their fit by sensitivity
            x.register_hook(
                lambda g: grad_rows[site].append(g.reshape(-1, g.shape[-1])[pick[0].to(g.device)].float().clone().cpu())
            )

    def pre_hook(site):
        return lambda m, args: record(site, args[0])

    def out_hook(site):
        return lambda m, args, out: record(site, out)

    handles = []
    for site in todo:
        name, target = site
        if target == "input":
            handles.append(modules[name].register_forward_pre_hook(pre_hook(site)))
        else:
            attention_of(model, name)
            handles.append(modules[name].register_forward_hook(out_hook(site)))
    was_training = model.training
    model.eval()
    try:
        for ids in tqdm(tokens, desc="calibrate activations / KV", disable=not progress, unit="window"):
            ids = to_model(ids.reshape(1, -1), model)
            n = ids.numel()
            pick[:] = [torch.randperm(n, generator=gen)[: min(ROWS_PER_WINDOW, n)].sort().values]
            if grads:
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                with torch.enable_grad():
                    model(inputs_embeds=emb, labels=ids, use_cache=False).loss.backward()
            else:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out: dict[str, torch.Tensor] = {}
    for site, fmts in todo.items():
        name, target = site
        x, pos = torch.cat(rows[site]), torch.cat(positions[site])
        g = torch.cat(grad_rows[site]) if grad_rows[site] else None
        for f in fmts:
            q = get_quantizer(f.quantizer)
            keep = pos >= int(dict(f.params).get("sinks", 0) or 0)  # sinks are not quantized: not fitted either
            xs, gs = x[keep], (g[keep] if g is not None else None)
            if target == "input":
                fitted = q.calibrate(xs, gs, f)
            else:
                fitted = q.calibrate(xs, gs, f, attention_of(model, name)[1].head_dim, target)
            out.update({calib_key(name, target, f, k): v.detach().float().contiguous() for k, v in fitted.items()})
    return out
