"""Measured quality: perplexity on held-out text and KL divergence to the reference.

The reference (unquantized) model's log-probabilities are computed once per
:class:`Evaluator` and spilled to a temporary file (fp16), then read back a slice at a
time; the LM head runs on a slice of positions at a time too
(:mod:`mpsearch.models.decoder`). So memory holds one slice of logits, and does not grow
with vocabulary x evaluation tokens (Gemma's 262k vocabulary over 16 x 512 tokens would be 4 GB).
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class Quality:
    ppl: float
    kl: float
    nll: float
    tokens: int

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "kl": self.kl, "nll": self.nll, "eval_tokens": self.tokens}


class _Spill:
    """An append-only temporary file of fp16 arrays, read back in the order written."""

    def __init__(self) -> None:
        from .cache import cache_dir

        self.file = tempfile.TemporaryFile(dir=cache_dir(), prefix="reference-logprobs-")
        self.index: list[tuple[int, tuple[int, ...]]] = []

    def append(self, t: torch.Tensor) -> None:
        a = t.detach().to(torch.float16).contiguous().numpy()
        self.index.append((self.file.tell(), a.shape))
        self.file.write(a.tobytes())

    def read(self, i: int) -> torch.Tensor:
        offset, shape = self.index[i]
        self.file.seek(offset)
        a = np.fromfile(self.file, dtype=np.float16, count=int(np.prod(shape))).reshape(shape)
        self.file.seek(0, 2)
        return torch.from_numpy(a)


class Evaluator:
    """Scores models on fixed evaluation tokens ``[n_chunks, seq_len]``.

    ``fit(reference)`` stores the reference log-probs (on disk); ``score(model)`` returns
    perplexity and mean per-token KL(reference || model). ``positions`` is how many
    positions are turned into log-probabilities at once.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int = 1, progress: bool = True, positions: int = 64) -> None:
        self.tokens = tokens
        self.batch_size = batch_size
        self.progress = progress
        self.positions = positions

    @torch.no_grad()
    def fit(self, reference: nn.Module) -> "Evaluator":
        self._spill = _Spill()
        nll_sum, n = 0.0, 0
        for logp, targets in self._logprobs(reference, "reference"):
            self._spill.append(logp)
            nll_sum += _nll_sum(logp, targets)
            n += targets.numel()
        self.reference_ = Quality(ppl=math.exp(nll_sum / n), kl=0.0, nll=nll_sum / n, tokens=n)
        return self

    @torch.no_grad()
    def score(self, model: nn.Module, desc: str = "eval") -> Quality:
        if not hasattr(self, "reference_"):
            raise RuntimeError("call fit(reference) before score(model)")
        return self._quality(model, desc)

    def _quality(self, model: nn.Module, desc: str = "eval") -> Quality:
        nll_sum, kl_sum, n = 0.0, 0.0, 0
        for i, (logp, targets) in enumerate(self._logprobs(model, desc)):
            nll_sum += _nll_sum(logp, targets)
            ref = self._spill.read(i).float()
            kl_sum += float((ref.exp() * (ref - logp)).sum())
            n += targets.numel()
        nll = nll_sum / n
        return Quality(ppl=math.exp(nll), kl=kl_sum / n, nll=nll, tokens=n)

    def _logprobs(self, model: nn.Module, desc: str):
        """Yield ``(log_probs[B, P, V], targets[B, P])`` per batch and slice of at most ``positions`` positions."""
        from .models.decoder import logit_slices

        model.eval()
        batches = torch.split(self.tokens, self.batch_size)
        for ids in tqdm(batches, desc=desc, disable=not self.progress, unit="batch", leave=False):
            for logits, targets in logit_slices(model, ids, self.positions):
                yield F.log_softmax(logits, dim=-1), targets


def _nll_sum(logp: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.nll_loss(logp.reshape(-1, logp.shape[-1]), targets.reshape(-1), reduction="sum"))


def evaluate_plan(plan, model: str = "smollm2", evaluation: str | None = None, seq_len: int = 512, chunks: int = 16, threads: int = 2,
                  progress: bool = True, space: str = "llama", all_tensors: bool = False) -> dict:
    """Load ``model``, measure the reference and ``plan`` on held-out text: ppl and KL for both.

    The plan is checked against the model (fingerprint, every format fits its tensor)
    before the reference pass; ``space``/``all_tensors`` as in :func:`mpsearch.quant.apply_`.
    """
    from .models import load_model, load_text, token_chunks
    from .models.data import DEFAULT_EVALUATION, DataError
    from .plan import Plan
    from .quant import applied
    from .quant.apply import check_plan

    if seq_len < 2 or chunks < 1:
        raise DataError(f"need --eval-seq-len >= 2 and --eval-chunks >= 1, got {seq_len}, {chunks}")
    torch.set_num_threads(threads)
    plan = Plan.load(plan) if not isinstance(plan, Plan) else plan
    text = load_text(evaluation or DEFAULT_EVALUATION)
    lm = load_model(model)
    check_plan(lm.model, plan, space=space, all_tensors=all_tensors)
    tokens = token_chunks(lm.tokenizer, text, seq_len, chunks)
    ev = Evaluator(tokens, progress=progress).fit(lm.model)
    with applied(lm.model, plan, space=space, all_tensors=all_tensors):
        q = ev.score(lm.model)
    return {"plan": q.to_dict(), "reference": ev.reference_.to_dict()}
