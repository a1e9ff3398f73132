"""Shared fixtures: tiny Llama models built from a config (no download)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# CI explores the same examples every run (a failure there is reproducible); local runs
# draw new ones each time and keep finding edge cases.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def layer_inputs(model, tokens, name: str) -> torch.Tensor:
    """Every input row the linear ``name`` sees over ``tokens`` (one forward per sequence), float64."""
    seen = []
    h = dict(model.named_modules())[name].register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for seq in tokens:
            model(input_ids=seq[None])
    h.remove()
    return torch.cat(seen).double()


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Tiny-model tests get their own cache folder; tests on the real default model share
    the user's cache, so the converted model is reused across tests and runs."""
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(2)


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3, 32), generator=g)


def tiny_tokenizer():
    """A character-level fast tokenizer built offline (no download), for whole-search tests."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def tiny_text(seed: int, words: int = 1500) -> str:
    """Deterministic word salad: enough characters for a few short token windows."""
    import random

    rng = random.Random(seed)
    vocab = ["the", "quant", "bits", "model", "plan", "weight", "of", "and", "a", "search", "tensor", "format"]
    return " ".join(rng.choice(vocab) for _ in range(words))


@pytest.fixture
def tiny_run(tmp_path):
    """A saved tiny Llama with its tokenizer, and calibration / evaluation text files.

    Returns ``config(**overrides)``, a :class:`mpsearch.SearchConfig` for a whole search on them.
    """
    from mpsearch.search import SearchConfig

    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(tiny_text(1))
    (tmp_path / "eval.txt").write_text(tiny_text(2))

    def config(**overrides) -> SearchConfig:
        base = dict(model=str(tmp_path / "tiny"), calibration=str(tmp_path / "calib.txt"), evaluation=str(tmp_path / "eval.txt"),
                    proxies=("fisher",), budgets=("uniform:3",), calib_chunks=4, calib_seq_len=32, eval_chunks=2, eval_seq_len=32,
                    refine=4, refine_chunks=2, refine_seq_len=32,
                    out_dir=str(tmp_path / "out"), progress=False)
        return SearchConfig(**{**base, **overrides})

    return config
