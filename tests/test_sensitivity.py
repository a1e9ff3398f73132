"""Measured per-tensor KL: the layer-tail shortcut equals a full evaluation, and it is cached."""

from __future__ import annotations

import pytest
import torch

from mpsearch.core.plan import Plan, fingerprint
from mpsearch.core.space import SearchSpace
from mpsearch.primitives import sensitivity
from mpsearch.primitives.sensitivity import measured_kl
from mpsearch.quant import applied


@pytest.fixture
def setup(model, tokens):
    decisions = SearchSpace.from_file("llama").build(model)
    return model, tokens, decisions[:4]  # layer 0's decisions keep the test quick


def test_tail_shortcut_equals_full_evaluation(setup):
    model, tokens, decisions = setup
    table = measured_kl(model, decisions, tokens, progress=False)
    assert len(table) == sum(len(d.members) * len(d.formats) for d in decisions)

    def logp():
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=tokens, use_cache=False).logits[:, :-1].float(), -1)

    ref = logp()
    for _, row in table.sample(6, random_state=0).iterrows():
        fmt = next(f for d in decisions for f in d.formats if f.key == row.format)
        plan = Plan("tiny", fingerprint(model), {row.tensor: {"weight": fmt}}, {}, {}, {})
        with applied(model, plan):  # the whole model, quantized tensor in place, fp32 reference
            full = float((ref.exp() * (ref - logp())).sum(-1).mean())
        assert row.kl == pytest.approx(full, rel=1e-4, abs=1e-7), (row.tensor, row.format)
    # fp16 is lossless here, 2-bit is not
    assert table[table.format == "fp16"].kl.abs().max() < 1e-6
    assert table[table.format.str.startswith("u2")].kl.min() > 0


def test_weights_are_restored_and_results_cached(setup, monkeypatch):
    model, tokens, decisions = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = measured_kl(model, decisions, tokens, weights_key="w1", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    def boom(*a, **k):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(sensitivity, "tail_runner", boom)
    again = measured_kl(model, decisions, tokens, weights_key="w1", progress=False)
    assert again.equals(first)


def test_corrupt_cache_is_recomputed(setup, caplog):
    model, tokens, decisions = setup
    measured_kl(model, decisions[:1], tokens, weights_key="w2", progress=False)
    from mpsearch.store.cache import cache_dir

    for p in (cache_dir() / "sensitivity").glob("*.json"):
        p.write_text("{not json")
    table = measured_kl(model, decisions[:1], tokens, weights_key="w2", progress=False)
    assert len(table) > 0 and "corrupt" in caplog.text


def test_measured_kl_proxy_reads_the_table(setup):
    from mpsearch.primitives import Primitives
    from mpsearch.proxies import load_proxy
    from mpsearch.proxies.table import proxy_table

    model, tokens, decisions = setup
    kl = measured_kl(model, decisions, tokens, progress=False)
    prims = Primitives(key="k", kl={(t, f): v for t, f, v in kl.itertuples(index=False)})
    table = proxy_table(load_proxy("measured_kl"), model, decisions, prims, progress=False)
    merged = table.merge(kl, on=["tensor", "format"])
    assert len(merged) == len(kl) and (merged.predicted == merged.kl).all()
    with pytest.raises(KeyError, match="measured KL was not computed"):
        proxy_table(load_proxy("measured_kl"), model, decisions, Primitives(key="k"), progress=False)
