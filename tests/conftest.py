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
