"""Shared fixtures: tiny Llama models built from a config (no download)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from tests.postgres import postgres_url  # noqa: F401  (fixture: a throwaway PostgreSQL server)

# CI explores the same examples every run (a failure there is reproducible); local runs
# draw new ones each time and keep finding edge cases.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def layer_inputs(model, tokens, name: str) -> torch.Tensor:
    """Every input row the linear ``name`` sees over ``tokens`` (one forward per sequence), float64."""
    seen = []
    h = dict(model.named_modules())[name].register_forward_hook(
        lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1]))
    )
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
    Task accuracy and the kernel timings are off unless a test turns them on (tests/test_costs.py).
    """
    from mpsearch.run.search import SearchConfig

    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(tiny_text(1))
    (tmp_path / "eval.txt").write_text(tiny_text(2))

    def config(**overrides) -> SearchConfig:
        base = dict(
            model=str(tmp_path / "tiny"),
            calibration=str(tmp_path / "calib.txt"),
            evaluation=str(tmp_path / "eval.txt"),
            proxies=("fisher",),
            budgets=("uniform:3",),
            calib_chunks=4,
            gram_chunks=8,
            calib_seq_len=32,
            eval_chunks=2,
            eval_seq_len=32,
            refine=4,
            refine_chunks=2,
            refine_seq_len=32,
            out_dir=str(tmp_path / "out"),
            progress=False,
            tasks=False,
            profile=False,
        )
        return SearchConfig(**{**base, **overrides})

    return config


def tiny_gguf(
    path, seed: int = 0, hidden: int = 256, intermediate: int = 512, layers: int = 2, source_type: str = "q8_0"
):
    """A tiny Llama written as a GGUF file (byte-level BPE tokenizer, no download): the
    source model for the GGUF export tests. Block linears are stored in ``source_type``."""
    import gguf
    import numpy as np

    from mpsearch.core.format import Format
    from mpsearch.quant.ggml import TYPES, pack

    g = np.random.default_rng(seed)
    byte_chars = [chr(c) for c in range(33, 127)]  # printable ASCII, each one token
    tokens = ["<unk>", "<s>", "</s>", "Ġ", "Ċ", *byte_chars]
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(hidden // 4)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    v = len(tokens)

    def f32(name, *shape, scale=0.02):
        w.add_tensor(name, (g.standard_normal(shape) * scale).astype(np.float32))

    def lin(name, out, inp):
        x = torch.from_numpy((g.standard_normal((out, inp)) * 0.05).astype(np.float32))
        t = TYPES[source_type]
        w.add_tensor(name, pack(x, Format.parse(source_type)), raw_dtype=t.qtype)

    f32("token_embd.weight", v, hidden)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        lin(f"blk.{i}.attn_q.weight", hidden, hidden)
        lin(f"blk.{i}.attn_k.weight", hidden // 2, hidden)
        lin(f"blk.{i}.attn_v.weight", hidden // 2, hidden)
        lin(f"blk.{i}.attn_output.weight", hidden, hidden)
        lin(f"blk.{i}.ffn_gate.weight", intermediate, hidden)
        lin(f"blk.{i}.ffn_up.weight", intermediate, hidden)
        lin(f"blk.{i}.ffn_down.weight", hidden, intermediate)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    f32("output.weight", v, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test."""
    import mpsearch.measure.evaluate  # noqa: F401
    import mpsearch.models
    import mpsearch.run.prepare

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(mpsearch.run.prepare, "load_model", refuse)
    monkeypatch.setattr(mpsearch.models, "load_model", refuse)
