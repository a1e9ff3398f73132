"""``mpsearch eval``: load a model and measure a saved plan against it on held-out text."""

from __future__ import annotations

import torch

from ..measure.evaluate import DecodeEvaluator, Evaluator


def evaluate_plan(
    plan,
    model: str = "smollm2",
    evaluation: str | None = None,
    seq_len: int = 512,
    chunks: int = 16,
    threads: int = 2,
    progress: bool = True,
    space: str = "llama",
    all_tensors: bool = False,
    context: int = 0,
    decode: int = 128,
    device: str = "auto",
) -> dict:
    """Load ``model``, measure the reference and ``plan`` on held-out text: ppl and KL for both.
    ``device`` (cpu, cuda, cuda:N, auto) is where the model runs and the plan is quantized; it is
    checked before anything loads.

    The plan is checked against the model (fingerprint, every format fits its tensor)
    before the reference pass; ``space``/``all_tensors`` as in :func:`mpsearch.quant.apply_`.
    ``context > 0``: windows of ``context`` tokens on the decode path (:class:`DecodeEvaluator`,
    the last ``decode`` tokens through the cache) instead of ``seq_len`` full-sequence windows.
    """
    from ..core.device import exact_fp32, resolve_device
    from ..core.plan import Plan
    from ..models import load_model, load_text, token_chunks
    from ..models.data import DEFAULT_EVALUATION, DataError
    from ..quant import applied
    from ..quant.apply import CheckedPlan

    if seq_len < 2 or chunks < 1:
        raise DataError(f"need --eval-seq-len >= 2 and --eval-chunks >= 1, got {seq_len}, {chunks}")
    dev = resolve_device(device)
    torch.set_num_threads(threads)
    plan = Plan.load(plan) if not isinstance(plan, Plan) else plan
    text = load_text(evaluation or DEFAULT_EVALUATION)
    lm = load_model(model)
    plan = CheckedPlan.of(lm.model, plan, space=space, all_tensors=all_tensors)  # once, before the reference pass
    lm.model.to(dev)
    exact_fp32(dev)
    tokens = token_chunks(lm.tokenizer, text, context or seq_len, chunks)
    ev = (DecodeEvaluator(tokens, decode, progress=progress) if context else Evaluator(tokens, progress=progress)).fit(
        lm.model
    )
    with applied(lm.model, plan):
        q = ev.score(lm.model)
    return {"plan": q.to_dict(), "reference": ev.reference_.to_dict()}
