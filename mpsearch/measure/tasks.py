"""Task accuracy of a causal LM, built offline from held-out text: reported next to ppl and KL.

- **cloze** (LAMBADA-style): the context is the text before a sentence's last word (a word
  of >= 3 letters, not a paragraph's first), the target is that word. Correct iff greedy
  decoding reproduces every target token (lm-eval's lambada ``acc``).
- **mc** (HellaSwag / StoryCloze shape): the context is the text before a sentence, the
  choices are that sentence and ``choices - 1`` sentences of similar token length from
  elsewhere in the text. ``acc``: the highest summed log-likelihood is the true sentence;
  ``acc_norm``: the same per UTF-8 byte of the choice (lm-eval divides by ``len(choice)``
  characters; the two agree on ASCII text).

Contexts are cut from the left to at most ``context_tokens`` tokens at a word start.
Pairs are tokenized as lm-eval's ``_encode_pair`` does: the continuation's tokens are those
of ``context + " " + continuation`` after the context's own tokens. Items depend only on
(text, tokenizer, settings); :func:`task_key` hashes them for caches.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

TASKS_SCHEMA = "tasks/v1"
_STOP = re.compile(r"[.!?]+[\"'\u2019\u201d)\]]*(?=\s|$)")
_FINAL_WORD = re.compile(r"([A-Za-z]{3,})[.!?]+[\"'\u2019\u201d)\]]*")
_ABBREV = frozenset({"Mr", "Mrs", "Dr", "St", "Messrs", "Esq", "Capt", "Col", "Rev"})
_SENTENCE = re.compile(r"[\"'\u201c]?[A-Z]")  # a sentence starts with a capital (after an opening quote)
_QUOTES = "\"'\u2018\u2019\u201c\u201d"


def _shape(sentence: str) -> tuple[bool, bool]:
    """Whether a sentence opens and closes a quotation: distractors match the true ending's, so quotes give nothing
    away."""
    return sentence[:1] in _QUOTES, (sentence.rstrip(")]") or " ")[-1] in _QUOTES


#: a multiple-choice ending (and distractor) has this many tokens
_ENDING_TOKENS = (4, 48)


@dataclass(frozen=True)
class TaskSettings:
    cloze_items: int = 200
    mc_items: int = 100
    context_tokens: int = 128
    choices: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name, least in (("cloze_items", 1), ("mc_items", 1), ("context_tokens", 2), ("choices", 2), ("seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"TaskSettings.{name} must be an int >= {least}, got {v!r}")


@dataclass(frozen=True)
class ClozeItem:
    context: str
    word: str
    context_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


@dataclass(frozen=True)
class MCItem:
    context: str
    endings: tuple[str, ...]
    label: int
    context_ids: tuple[int, ...]
    ending_ids: tuple[tuple[int, ...], ...]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """lm-eval's ``_encode_pair`` with ``target_delimiter=" "``: the context's tokens, and the
    tokens of ``context + " " + continuation`` after as many tokens as the context has."""
    ctx = _ids(tokenizer, context)
    return tuple(ctx), tuple(_ids(tokenizer, context + " " + continuation)[len(ctx) :])


def sentences(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every sentence: text up to ``.``, ``!`` or ``?`` (closing quotes
    included; not after Mr, Mrs, ...) or a paragraph end (a blank line)."""
    cuts = {
        m.end()
        for m in _STOP.finditer(text)
        if re.search(r"(\w*)$", text[max(0, m.start() - 8) : m.start()])[1] not in _ABBREV
    }
    cuts |= {m.start() for m in re.finditer(r"\n\s*\n", text)} | {len(text)}
    out, prev = [], 0
    for c in sorted(cuts):
        seg = text[prev:c]
        s, e = prev + len(seg) - len(seg.lstrip()), prev + len(seg.rstrip())
        if e > s:
            out.append((s, e))
        prev = c
    return out


def _context(text: str, cut: int, tokenizer, max_tokens: int) -> str:
    """The text before ``cut``, from the earliest word start that leaves at most ``max_tokens`` tokens."""
    span = 8 * max_tokens
    while True:
        lo = max(0, cut - span)
        starts = ([0] if lo == 0 else []) + [lo + m.end() for m in re.finditer(r"\s+", text[lo:cut])]
        a, b = 0, len(starts)  # the first start in [a, b) whose context fits
        while a < b:
            mid = (a + b) // 2
            if len(_ids(tokenizer, text[starts[mid] : cut])) <= max_tokens:
                b = mid
            else:
                a = mid + 1
        if a > 0 or lo == 0:
            return text[starts[a] : cut].strip() if a < len(starts) else ""
        span *= 2


def _pick(candidates: list, n: int, seed: str, make, what: str, text: str) -> list:
    """``n`` items made from candidates drawn in a seeded order, returned in text order.

    ``make`` returns ``None`` to skip a candidate."""
    order = list(range(len(candidates)))
    random.Random(seed).shuffle(order)
    chosen = []
    for i in order:
        item = make(candidates[i])
        if item is not None:
            chosen.append((i, item))
            if len(chosen) == n:
                return [item for _, item in sorted(chosen, key=lambda t: t[0])]
    raise ValueError(
        f"text too short for {n} {what} items: {len(text)} characters give only {len(chosen)} "
        f"(of {len(candidates)} candidates); use a longer held-out text or fewer items"
    )


def build_cloze(text: str, tokenizer, n: int, context_tokens: int, seed: int) -> list[ClozeItem]:
    """``n`` LAMBADA-style items: sentence-final words of >= 3 letters with their preceding text."""
    starts = []
    for s, e in sentences(text):
        chunk = text[s:e].split()[-1]
        w = e - len(chunk)
        if w > 0 and text[w - 1] == " " and (m := _FINAL_WORD.fullmatch(chunk)):
            starts.append((w, m[1]))
    min_ctx = max(1, context_tokens // 2)

    def make(c):
        ctx = _context(text, c[0] - 1, tokenizer, context_tokens)
        cids, tids = encode_pair(tokenizer, ctx, c[1])
        return ClozeItem(ctx, c[1], cids, tids) if len(cids) >= min_ctx and tids else None

    return _pick(starts, n, f"cloze:{seed}", make, "cloze", text)


def build_mc(text: str, tokenizer, n: int, context_tokens: int, choices: int, seed: int) -> list[MCItem]:
    """``n`` continuation items: a context, its true next sentence and ``choices - 1`` distractors."""
    spans = sentences(text)
    lengths = (
        [len(t) for t in tokenizer([" " + text[s:e] for s, e in spans], add_special_tokens=False).input_ids]
        if spans
        else []
    )
    first, pool = {}, []
    for i, (s, e) in enumerate(spans):  # distinct sentences of a usable length that start a sentence: the distractors
        if (
            _ENDING_TOKENS[0] <= lengths[i] <= _ENDING_TOKENS[1]
            and _SENTENCE.match(text, s)
            and first.setdefault(text[s:e], i) == i
        ):
            pool.append(i)
    shape = [_shape(text[s:e]) for s, e in spans]
    ends = [i for i in pool if spans[i][0] > 0 and text[spans[i][0] - 1] == " "]
    stops = [e for _, e in spans]
    rng = random.Random(f"mc:{seed}")
    min_ctx = max(1, context_tokens // 2)

    def make(i):
        s, e = spans[i]
        ctx = _context(text, s - 1, tokenizer, context_tokens)
        lo = bisect.bisect_right(
            stops, s - 1 - len(ctx)
        )  # the item's own sentences (and the next 5) are no distractors
        near = sorted(
            (j for j in pool if not lo <= j <= i + 5 and shape[j] == shape[i]),
            key=lambda j: (abs(lengths[j] - lengths[i]), j),
        )
        if len(near) < choices - 1:
            return None
        picked = [text[spans[j][0] : spans[j][1]] for j in rng.sample(near[: 8 * (choices - 1)], choices - 1)]
        endings = [text[s:e], *picked]
        rng.shuffle(endings)
        pairs = [encode_pair(tokenizer, ctx, x) for x in endings]
        if len(pairs[0][0]) < min_ctx or not all(p[1] for p in pairs):
            return None
        return MCItem(ctx, tuple(endings), endings.index(text[s:e]), pairs[0][0], tuple(p[1] for p in pairs))

    return _pick(ends, n, f"mc:{seed}", make, "multiple-choice", text)


def task_key(cloze: list[ClozeItem], mc: list[MCItem], settings: TaskSettings, bos: list[int]) -> str:
    """Hash of the items' token ids, the leading tokens and the settings: what decides a task score."""
    blob = json.dumps(
        [
            TASKS_SCHEMA,
            asdict(settings),
            list(bos),
            [[c.context_ids, c.target_ids] for c in cloze],
            [[m.context_ids, m.ending_ids, m.label] for m in mc],
        ]
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def wilson_ci(acc: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of an accuracy over ``n`` items (95% by default)."""
    if n < 1:
        return float("nan"), float("nan")
    d = 1 + z * z / n
    mid, half = (acc + z * z / (2 * n)) / d, z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


@torch.no_grad()
def continuation_scores(
    model,
    seqs: list[tuple[list[int], int]],
    batch_size: int = 16,
    positions: int = 64,
    progress: bool = False,
    desc: str = "tasks",
) -> tuple[list[float], list[bool]]:
    """Per ``(ids, n)``: the summed log-likelihood of the last ``n`` tokens given those before,
    and whether greedy decoding reproduces all of them. Sequences run ``batch_size`` at a
    time (longest first), padded on the right with an attention mask; the LM head and
    log-softmax run only on the scored positions, ``positions`` at a time."""
    from ..core.device import model_device
    from ..models.decoder import decoder_parts, head

    parts = decoder_parts(model) if isinstance(model, nn.Module) else None
    dev = model_device(model)  # the batch is built on the CPU and moved there; the sums come back once per batch
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))
    ll, hit = [0.0] * len(seqs), [False] * len(seqs)
    for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        rows = order[b : b + batch_size]
        width = max(len(seqs[i][0]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        r_idx, c_idx = [], []
        for r, i in enumerate(rows):
            s, n = seqs[i]
            if not 1 <= n < len(s):
                raise ValueError(f"sequence {i}: {n} scored tokens of {len(s)}; need at least one token before them")
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
            r_idx += [r] * n
            c_idx += range(len(s) - n - 1, len(s) - 1)
        ids, mask, r_idx, c_idx = (
            ids.to(dev),
            mask.to(dev),
            torch.tensor(r_idx, device=dev),
            torch.tensor(c_idx, device=dev),
        )
        if parts is None:
            picked = model(input_ids=ids, attention_mask=mask).logits[r_idx, c_idx]
        else:
            picked = parts[0](input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[r_idx, c_idx]
        target = ids[r_idx, c_idx + 1]
        lp, ok = torch.empty(len(target), device=dev), torch.empty(len(target), dtype=torch.bool, device=dev)
        for s in range(0, len(target), positions):
            logits = head(parts, picked[s : s + positions]) if parts else picked[s : s + positions].float()
            t = target[s : s + positions]
            lp[s : s + positions] = F.log_softmax(logits, dim=-1).gather(1, t[:, None])[:, 0]
            ok[s : s + positions] = logits.argmax(-1) == t
        sums = torch.zeros(len(rows), dtype=torch.float64, device=dev).index_add_(0, r_idx, lp.double()).cpu()
        misses = torch.zeros(len(rows), dtype=torch.long, device=dev).index_add_(0, r_idx, (~ok).long()).cpu()
        for r, i in enumerate(rows):
            ll[i], hit[i] = float(sums[r]), bool(misses[r] == 0)
    return ll, hit


class TaskEvaluator:
    """Cloze and multiple-choice accuracy of a causal LM on items built from ``text``.

    The items are built here (a text too short raises ``ValueError``); ``bos``: token ids
    put in front of every item, ``None`` for the tokens the tokenizer puts in front of text
    (:func:`mpsearch.models.data.leading_tokens`, as the evaluation windows get them).
    """

    def __init__(
        self,
        text,
        tokenizer,
        settings: TaskSettings = TaskSettings(),
        bos: list[int] | None = None,
        progress: bool = True,
        batch_size: int = 16,
        positions: int = 64,
    ) -> None:
        from ..models.data import leading_tokens

        self.text = getattr(text, "text", text)
        self.tokenizer, self.settings, self.progress = tokenizer, settings, progress
        self.batch_size, self.positions = batch_size, positions
        self.bos = list(leading_tokens(tokenizer) if bos is None else bos)
        s = settings
        self.cloze = build_cloze(self.text, tokenizer, s.cloze_items, s.context_tokens, s.seed)
        self.mc = build_mc(self.text, tokenizer, s.mc_items, s.context_tokens, s.choices, s.seed)

    @property
    def cache_parts(self) -> tuple:
        """What decides a score besides the model: key caches by ``content_key(weights, plan, *cache_parts)``."""
        return "tasks", TASKS_SCHEMA, task_key(self.cloze, self.mc, self.settings, self.bos)

    @torch.no_grad()
    def score(self, model, desc: str = "tasks", per_item: bool = False) -> dict:
        """``cloze_acc``, ``mc_acc``, ``mc_acc_norm`` and the item counts; ``per_item`` adds
        0/1 lists (``cloze_correct``, ``mc_correct``, ``mc_norm_correct``) for paired tests."""
        if isinstance(model, nn.Module):
            model.eval()
        seqs = [(self.bos + list(c.context_ids) + list(c.target_ids), len(c.target_ids)) for c in self.cloze]
        seqs += [(self.bos + list(m.context_ids) + list(e), len(e)) for m in self.mc for e in m.ending_ids]
        ll, greedy = continuation_scores(model, seqs, self.batch_size, self.positions, self.progress, desc)
        cloze = [int(g) for g in greedy[: len(self.cloze)]]
        mc, mc_norm, at = [], [], len(self.cloze)
        for m in self.mc:
            lls = ll[at : at + len(m.endings)]
            at += len(m.endings)
            norm = [v / len(e.encode("utf-8")) for v, e in zip(lls, m.endings)]
            mc.append(int(max(range(len(lls)), key=lls.__getitem__) == m.label))
            mc_norm.append(int(max(range(len(norm)), key=norm.__getitem__) == m.label))
        out = {
            "cloze_acc": sum(cloze) / len(cloze),
            "mc_acc": sum(mc) / len(mc),
            "mc_acc_norm": sum(mc_norm) / len(mc_norm),
            "cloze_items": len(cloze),
            "mc_items": len(mc),
        }
        if per_item:
            out.update(cloze_correct=cloze, mc_correct=mc, mc_norm_correct=mc_norm)
        return out
