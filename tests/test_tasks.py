"""Offline task accuracy (cloze and multiple choice) on items built from held-out text."""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpsearch.measure.tasks import (
    TaskEvaluator,
    TaskSettings,
    build_cloze,
    build_mc,
    continuation_scores,
    sentences,
    wilson_ci,
)
from mpsearch.models.data import leading_tokens

from .conftest import tiny_llama, tiny_tokenizer
from .test_models import bos_tokenizer

WORDS = [
    "anne",
    "walter",
    "letter",
    "house",
    "friend",
    "captain",
    "morning",
    "sister",
    "to",
    "a",
    "the",
    "and",
    "was",
    "Mrs. Smith",
]
SMALL = TaskSettings(cloze_items=12, mc_items=6, context_tokens=48, choices=4)


def story(seed: int, paragraphs: int = 40) -> str:
    """Paragraphs of short sentences (some quoted, some naming Mrs. Smith), blank lines between."""
    rng = random.Random(seed)
    paras = []
    for _ in range(paragraphs):
        sents = []
        for _ in range(rng.randint(1, 5)):
            s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            s = s[0].upper() + s[1:] + rng.choice(".!?")
            sents.append(f'"{s}"' if rng.random() < 0.2 else s)
        paras.append(" ".join(sents))
    return "\n\n".join(paras)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), text_seed=st.integers(0, 10**6))
def test_cloze_items_are_the_texts_next_words(seed, text_seed):
    tok, text = tiny_tokenizer(), story(text_seed)
    items = build_cloze(text, tok, 10, 40, seed)
    assert items == build_cloze(text, tok, 10, 40, seed)  # deterministic
    for c in items:
        at = text.find(c.context + " " + c.word)
        assert at >= 0 and text[at + len(c.context) + 1 + len(c.word)] in ".!?"  # the sentence's last word
        assert len(c.word) >= 3 and c.word.isalpha() and c.word != "Mrs"
        assert 20 <= len(c.context_ids) <= 40 and not c.context[0].isspace()
        assert (
            list(c.context_ids) + list(c.target_ids)
            == tok(c.context + " " + c.word, add_special_tokens=False).input_ids
        )
        assert "".join(tok.convert_ids_to_tokens(list(c.target_ids))) == " " + c.word


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), text_seed=st.integers(0, 10**6), choices=st.integers(2, 5))
def test_mc_items_have_exactly_one_true_ending(seed, text_seed, choices):
    tok, text = tiny_tokenizer(), story(text_seed)
    items = build_mc(text, tok, 6, 40, choices, seed)
    assert items == build_mc(text, tok, 6, 40, choices, seed)
    for m in items:
        assert len(m.endings) == len(set(m.endings)) == len(m.ending_ids) == choices
        true = [i for i, e in enumerate(m.endings) if m.context + " " + e in text]
        assert true == [m.label]
        assert all(e[0] == '"' for e in m.endings) or all(e[0] != '"' for e in m.endings)  # quotes give nothing away
        for e, ids in zip(m.endings, m.ending_ids):
            assert list(m.context_ids) + list(ids) == tok(m.context + " " + e, add_special_tokens=False).input_ids


def test_sentences_do_not_end_after_mrs():
    text = 'She saw Mrs. Smith today. "Did you?" asked Anne!\n\nYes indeed'
    assert [text[s:e] for s, e in sentences(text)] == [
        "She saw Mrs. Smith today.",
        '"Did you?"',
        "asked Anne!",
        "Yes indeed",
    ]


def oracle(tok, text: str, knows: bool):
    """A plain callable LM over the character tokenizer: on a row that is a stretch of ``text``
    it puts all mass on the row's own next tokens (``knows``) or away from them (not ``knows``);
    on any other row, the opposite. (The tokenizer reads blank lines as ``<unk>``: left out of both.)"""
    chars = tok.convert_ids_to_tokens(list(range(len(tok))))
    text = text.replace("\n", "")

    def model(input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, len(tok))
        for r, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            n = int(mask.sum())
            s = "".join(chars[int(i)] for i in ids[:n] if int(i) > 1)
            good = (s in text) == knows
            nxt = torch.cat([ids[1:n], ids[:1]])
            logits[r, torch.arange(n), nxt if good else (nxt + 1) % len(tok)] = 20.0
        return SimpleNamespace(logits=logits)

    return model


@pytest.mark.parametrize("knows, acc", [(True, 1.0), (False, 0.0)])
def test_accuracy_of_a_model_that_knows_the_text_and_of_an_adversary(knows, acc):
    tok, text = tiny_tokenizer(), story(3)
    ev = TaskEvaluator(text, tok, SMALL, progress=False)
    r = ev.score(oracle(tok, text, knows))
    assert r == {"cloze_acc": acc, "mc_acc": acc, "mc_acc_norm": acc, "cloze_items": 12, "mc_items": 6}


def test_padding_and_batching_do_not_change_scores():
    tok, text = tiny_tokenizer(), story(4)
    model = tiny_llama(seed=1, vocab=len(tok))
    ev = TaskEvaluator(text, tok, SMALL, progress=False)
    seqs = [(list(c.context_ids) + list(c.target_ids), len(c.target_ids)) for c in ev.cloze]
    seqs += [(list(m.context_ids) + list(e), len(e)) for m in ev.mc for e in m.ending_ids]
    one = continuation_scores(model, seqs, batch_size=1)
    many = continuation_scores(model, seqs, batch_size=16, positions=7)
    plain = continuation_scores(lambda **kw: model(**kw), seqs, batch_size=16)  # the whole logits, no head slicing
    for ll, hit in (many, plain):
        assert ll == pytest.approx(one[0], abs=1e-4) and hit == one[1]
    ev.batch_size = 1
    a = ev.score(model, per_item=True)
    ev.batch_size = 16
    assert ev.score(model, per_item=True) == a


def test_too_short_text_is_refused():
    tok, text = tiny_tokenizer(), story(5, paragraphs=3)
    with pytest.raises(ValueError, match="too short for 50 cloze items"):
        build_cloze(text, tok, 50, 40, 0)
    with pytest.raises(ValueError, match="too short for 50 multiple-choice items"):
        build_mc(text, tok, 50, 40, 4, 0)
    with pytest.raises(ValueError, match="too short"):
        TaskEvaluator(text, tok, TaskSettings(cloze_items=50), progress=False)


@pytest.mark.parametrize(
    "field, value", [("cloze_items", 0), ("mc_items", -1), ("context_tokens", 1), ("choices", 1), ("seed", 1.5)]
)
def test_bad_settings_name_their_field(field, value):
    with pytest.raises(ValueError, match=f"TaskSettings.{field}"):
        TaskSettings(**{field: value})


def test_leading_tokens_and_cache_key():
    """BOS goes in front of every item where the tokenizer adds one; the key follows the items."""
    text = story(6)
    plain = TaskEvaluator(text, tiny_tokenizer(), SMALL, progress=False)
    bos = TaskEvaluator(text, bos_tokenizer(), SMALL, progress=False)
    assert plain.bos == [] and bos.bos == leading_tokens(bos_tokenizer()) == [1]
    assert TaskEvaluator(text, bos_tokenizer(), SMALL, bos=[], progress=False).cache_parts == plain.cache_parts
    assert bos.cache_parts != plain.cache_parts
    assert TaskEvaluator(text, tiny_tokenizer(), SMALL, progress=False).cache_parts == plain.cache_parts
    other = TaskEvaluator(text, tiny_tokenizer(), replace(SMALL, seed=1), progress=False)
    assert other.cache_parts != plain.cache_parts
    seen = []
    model = tiny_llama(vocab=len(bos_tokenizer()))
    h = model.model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append(a[0][:, 0]))
    bos.score(model)
    h.remove()
    assert all((first == 1).all() for first in seen)


def test_wilson_interval():
    lo, hi = wilson_ci(0.5, 100)
    assert 0.39 < lo < 0.5 < hi < 0.61
    assert wilson_ci(0.0, 10)[0] == 0.0 and wilson_ci(1.0, 10)[1] == 1.0
