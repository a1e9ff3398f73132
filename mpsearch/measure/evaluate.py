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
from dataclasses import dataclass, field

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
    #: per evaluation window (batch), its mean NLL and mean KL: what bootstrap CIs resample
    nll_windows: list[float] = field(default_factory=list)
    kl_windows: list[float] = field(default_factory=list)
    #: top-1 accuracy, for a classifier (None for an LM)
    accuracy: float | None = None

    def to_dict(self) -> dict:
        out = {"ppl": self.ppl, "kl": self.kl, "nll": self.nll, "eval_tokens": self.tokens}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        if self.kl_windows:
            out.update(nll_windows=self.nll_windows, kl_windows=self.kl_windows)
        return out


class _Spill:
    """An append-only temporary file of fp16 arrays, read back in the order written."""

    def __init__(self) -> None:
        from ..store.cache import cache_dir, cache_writable

        # the cache's disk by default (a small /tmp may not hold Gemma's 4 GB); the system's when the cache is read-only
        self.dir = cache_dir() if cache_writable() else None
        self.file = tempfile.TemporaryFile(dir=self.dir, prefix="reference-logprobs-")
        self.index: list[tuple[int, tuple[int, ...]]] = []

    def append(self, t: torch.Tensor) -> None:
        a = t.detach().to(torch.float16).cpu().contiguous().numpy()  # fp16 before the copy: half the bytes off a GPU
        self.index.append((self.file.tell(), a.shape))
        try:
            self.file.write(a.tobytes())
        except OSError as e:
            where = self.dir or tempfile.gettempdir()
            raise OSError(
                e.errno,
                f"{e.strerror} while spilling the reference log-probs ({a.nbytes * len(self.index) / 1e6:.0f} MB "
                f"so far) to {where}; free space there, or set MPSEARCH_CACHE or TMPDIR to a larger disk",
                str(where),
            ) from None

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
        for _, logp, targets in self._logprobs(reference, "reference"):
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
        windows = len(torch.split(self.tokens, self.batch_size))
        nll_w, kl_w, n_w = [0.0] * windows, [0.0] * windows, [0] * windows
        for i, (w, logp, targets) in enumerate(self._logprobs(model, desc)):
            ref = self._spill.read(i).float().to(logp.device)
            nll_w[w] += _nll_sum(logp, targets)
            kl_w[w] += float((ref.exp() * (ref - logp)).sum())
            n_w[w] += targets.numel()
        n = sum(n_w)
        nll = sum(nll_w) / n
        return Quality(
            ppl=math.exp(nll),
            kl=sum(kl_w) / n,
            nll=nll,
            tokens=n,
            nll_windows=[a / b for a, b in zip(nll_w, n_w)],
            kl_windows=[a / b for a, b in zip(kl_w, n_w)],
        )

    def _logprobs(self, model: nn.Module, desc: str):
        """Yield ``(window, log_probs[B, P, V], targets[B, P])`` per batch (window) and slice of at most ``positions``
        positions."""
        from ..models.decoder import logit_slices

        model.eval()
        batches = torch.split(self.tokens, self.batch_size)
        for w, ids in enumerate(tqdm(batches, desc=desc, disable=not self.progress, unit="batch", leave=False)):
            for logits, targets in logit_slices(model, ids, self.positions):
                yield w, F.log_softmax(logits, dim=-1), targets


class ClassifierEvaluator:
    """Scores a classifier on labelled batches: accuracy, mean cross-entropy (``nll``; ``ppl``
    is its exp), and mean KL(reference || model) over examples; ``tokens`` counts examples."""

    def __init__(self, data, progress: bool = True) -> None:
        self.tokens = data  # named as the LM evaluator's, so caches key both the same way
        self.batch_size = data.batch_size
        self.progress = progress

    @torch.no_grad()
    def fit(self, reference: nn.Module) -> "ClassifierEvaluator":
        reference.eval()
        self._ref = [F.log_softmax(self.tokens.logits(reference, i), dim=-1) for i in range(len(self.tokens))]
        self.reference_ = self._score(reference, self._ref)
        return self

    @torch.no_grad()
    def score(self, model: nn.Module, desc: str = "eval") -> Quality:
        if not hasattr(self, "reference_"):
            raise RuntimeError("call fit(reference) before score(model)")
        model.eval()
        return self._score(
            model,
            [
                F.log_softmax(self.tokens.logits(model, i), dim=-1)
                for i in tqdm(range(len(self.tokens)), desc=desc, disable=not self.progress, leave=False)
            ],
        )

    def _score(self, model: nn.Module, logps: list[torch.Tensor]) -> Quality:
        nll_w, kl_w, correct, n = [], [], 0, 0
        for i, logq in enumerate(logps):
            y = self.tokens.batch(i)[1].to(logq.device)
            ref = self._ref[i]
            nll_w.append(float(F.nll_loss(logq, y, reduction="mean")))
            kl_w.append(float((ref.exp() * (ref - logq)).sum(-1).mean()))
            correct += int((logq.argmax(-1) == y).sum())
            n += len(y)
        sizes = [len(self.tokens.batch(i)[1]) for i in range(len(logps))]
        nll = sum(a * b for a, b in zip(nll_w, sizes)) / n
        kl = sum(a * b for a, b in zip(kl_w, sizes)) / n
        return Quality(
            ppl=math.exp(nll), kl=kl, nll=nll, tokens=n, nll_windows=nll_w, kl_windows=kl_w, accuracy=correct / n
        )


def _nll_sum(logp: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.nll_loss(logp.reshape(-1, logp.shape[-1]), targets.reshape(-1), reduction="sum"))


class DecodeEvaluator:
    """Quality on the inference path through the KV cache: each window ``[context]`` is prefilled
    ``chunk`` tokens at a time through a cache, then its last ``decode`` tokens are fed one at a
    time (teacher-forced), each step reading everything before it from the cache. Scored: the
    predictions of those last ``decode`` tokens, perplexity and KL(reference || model).

    A quantized cache (:mod:`mpsearch.quant.hooks`) is thus read by every later chunk and every
    decode step, as a deployment reads it. Only a causal LM with ``model.model`` / ``lm_head``.
    Per-window values (for bootstrap CIs) are per ``block`` decoded tokens of each window.
    """

    def __init__(
        self, tokens: torch.Tensor, decode: int = 128, chunk: int = 1024, progress: bool = True, block: int = 32
    ) -> None:
        if tokens.dim() != 2 or not 1 <= decode < tokens.shape[1]:
            raise ValueError(
                f"DecodeEvaluator needs windows [n, context] longer than decode={decode}; got shape "
                f"{tuple(tokens.shape)}"
            )
        block = min(block, decode)
        if block < 1 or decode % block:
            raise ValueError(
                f"decode ({decode}) must be a multiple of {block} (the block of decoded tokens per bootstrap window)"
            )
        self.tokens, self.decode, self.chunk, self.progress, self.block = tokens, decode, chunk, progress, block

    @property
    def cache_parts(self) -> tuple:
        """What besides the tokens decides a measurement (the evaluation cache's key)."""
        return "decode", self.decode, self.chunk, self.block

    @torch.no_grad()
    def fit(self, reference: nn.Module) -> "DecodeEvaluator":
        self._spill = _Spill()
        nll = []
        for logp, targets in self._logprobs(reference, "reference (decode)"):
            self._spill.append(logp)
            nll.append(_nll_sum(logp, targets) / targets.numel())
        n = len(nll) * self.decode
        self.reference_ = Quality(ppl=math.exp(sum(nll) / len(nll)), kl=0.0, nll=sum(nll) / len(nll), tokens=n)
        return self

    @torch.no_grad()
    def score(self, model: nn.Module, desc: str = "eval (decode)") -> Quality:
        if not hasattr(self, "reference_"):
            raise RuntimeError("call fit(reference) before score(model)")
        nll_w, kl_w = [], []
        for i, (logp, targets) in enumerate(self._logprobs(model, desc)):
            ref = self._spill.read(i).float().to(logp.device)
            for s in range(
                0, self.decode, self.block
            ):  # a window per block of decoded tokens: what bootstrap CIs resample
                lp, r, t = logp[s : s + self.block], ref[s : s + self.block], targets[s : s + self.block]
                nll_w.append(_nll_sum(lp, t) / t.numel())
                kl_w.append(float((r.exp() * (r - lp)).sum()) / t.numel())
        nll = sum(nll_w) / len(nll_w)
        return Quality(
            ppl=math.exp(nll),
            kl=sum(kl_w) / len(kl_w),
            nll=nll,
            tokens=len(self.tokens) * self.decode,
            nll_windows=nll_w,
            kl_windows=kl_w,
        )

    def _logprobs(self, model: nn.Module, desc: str):
        """Per window: ``(log_probs[D, V], targets[D])`` of its last ``decode`` tokens, read through the cache."""
        from transformers import DynamicCache

        from ..core.device import to_model
        from ..models.decoder import decoder_parts, head

        parts = decoder_parts(model)
        if parts is None:
            raise ValueError("the decode path needs a causal LM with model.model and lm_head")
        body = parts[0]
        model.eval()
        for ids in tqdm(self.tokens, desc=desc, disable=not self.progress, unit="window", leave=False):
            ids = to_model(ids.reshape(1, -1), model)
            prefill = ids.shape[1] - self.decode
            cache = DynamicCache(config=model.config)
            for s in range(0, prefill, self.chunk):
                hidden = body(
                    input_ids=ids[:, s : min(s + self.chunk, prefill)], cache=cache, use_cache=True
                ).last_hidden_state
            steps = [hidden[:, -1:]]
            for t in range(prefill, ids.shape[1] - 1):
                steps.append(body(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).last_hidden_state)
            logits = head(parts, torch.cat(steps, dim=1))[0]
            yield F.log_softmax(logits, dim=-1), ids[0, prefill:]


def evaluator_for(batches, progress: bool = True):
    """The evaluator of what ``batches`` hold: next-token windows (perplexity and KL) or labelled
    examples (:class:`~mpsearch.models.batches.LabelledBatches`: accuracy, loss and KL)."""
    from ..models.batches import LabelledBatches

    if isinstance(batches, LabelledBatches):
        return ClassifierEvaluator(batches, progress=progress)
    return Evaluator(batches.tokens, progress=progress)
