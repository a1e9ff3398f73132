"""One calibration pass that gathers what the proxies are built from.

Per decision tensor: the empirical Fisher diagonal (mean over calibration sequences of
the squared per-sequence gradient; not the square of the batch gradient) and the
diagonal of the layer-input second moment, ``diag(X^T X) / n_tokens`` (GPTQ's Hessian
up to a factor). Only decision weights get gradients, so the backward pass is no
wider than it has to be.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def calibrate(
    model: nn.Module,
    tensors: list[str],
    tokens: torch.Tensor,
    fisher: bool = True,
    xtx: bool = True,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return ``(fisher, xtx)`` dicts keyed by module name (empty when not asked for)."""
    modules = dict(model.named_modules())
    missing = [t for t in tensors if not isinstance(modules.get(t), nn.Linear)]
    if missing:
        raise KeyError(f"not linear layers of this model: {missing[:5]}")
    f_acc = {t: torch.zeros_like(modules[t].weight, dtype=torch.float32) for t in tensors} if fisher else {}
    x_acc = {t: torch.zeros(modules[t].in_features, dtype=torch.float64) for t in tensors} if xtx else {}
    n_tok = 0
    hooks = []
    if xtx:
        for t in tensors:
            def hook(mod, args, out, t=t):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
                x_acc[t] += (x * x).sum(0)
            hooks.append(modules[t].register_forward_hook(hook))
    flags = {t: modules[t].weight.requires_grad for t in tensors}
    try:
        for t in tensors:
            modules[t].weight.requires_grad_(fisher)
        for seq in tqdm(tokens, desc="calibration (fisher, x^T x)", disable=not progress, unit="seq"):
            ids = seq.unsqueeze(0)
            with torch.set_grad_enabled(fisher):
                out = model(input_ids=ids, labels=ids, use_cache=False)
            n_tok += ids.numel()
            if fisher:
                grads = torch.autograd.grad(out.loss, [modules[t].weight for t in tensors])
                for t, g in zip(tensors, grads):
                    f_acc[t] += g.float() ** 2
    finally:
        for h in hooks:
            h.remove()
        for t, flag in flags.items():
            modules[t].weight.requires_grad_(flag)
    n_seq = len(tokens)
    fisher_out = {t: v / n_seq for t, v in f_acc.items()}
    xtx_out = {t: (v / n_tok).float() for t, v in x_acc.items()}
    return fisher_out, xtx_out
