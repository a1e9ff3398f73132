"""Hutchinson trace/diagonal: unbiased against the exact Hessian, batched = one at a time."""

from __future__ import annotations

import pytest
import torch

from mpsearch.primitives.hessian import hutchinson

from .conftest import tiny_llama

NAME = "model.layers.0.self_attn.k_proj"


@pytest.fixture(scope="module")
def small():
    model = tiny_llama(hidden=32, intermediate=64, vocab=64, layers=1)
    toks = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    return model, toks


def exact_hessian(model, toks, name):
    from torch.func import functional_call

    model.set_attn_implementation("eager")
    w = dict(model.named_modules())[name].weight.detach().clone()

    def loss(v):
        return functional_call(
            model, {name + ".weight": v}, kwargs=dict(input_ids=toks, labels=toks, use_cache=False)
        ).loss

    h = torch.autograd.functional.hessian(loss, w).reshape(w.numel(), w.numel())
    model.set_attn_implementation("sdpa")
    return h


def test_trace_and_diagonal_match_the_exact_hessian(small):
    model, toks = small
    h = exact_hessian(model, toks, NAME)
    est = hutchinson(model, [NAME], toks, probes=1500, batch=100, progress=False)
    assert abs(est.trace[NAME] - float(h.diagonal().sum())) < 4 * est.trace_se[NAME]
    diag = est.diag[NAME].flatten()
    assert torch.corrcoef(torch.stack([diag, h.diagonal()]))[0, 1] > 0.9
    assert model.config._attn_implementation == "sdpa"  # restored after the double backward
    assert not any(p.requires_grad for p in model.parameters())


def test_batched_probes_equal_one_at_a_time(small, monkeypatch):
    model, toks = small
    a = hutchinson(model, [NAME], toks, probes=12, batch=4, progress=False)

    def one_at_a_time(grads, params, zs):
        outs = [
            torch.autograd.grad(grads, params, grad_outputs=[z[k] for z in zs], retain_graph=True)
            for k in range(zs[0].shape[0])
        ]
        return [torch.stack([o[i] for o in outs]) for i in range(len(params))]

    monkeypatch.setattr("mpsearch.primitives.hessian._hvp", one_at_a_time)
    b = hutchinson(model, [NAME], toks, probes=12, batch=4, progress=False)
    assert a.trace[NAME] == pytest.approx(b.trace[NAME], rel=1e-5)
    assert torch.allclose(a.diag[NAME], b.diag[NAME], rtol=1e-4, atol=1e-7)


def test_tolerance_stops_early_with_every_tensor_below_it(small):
    model, toks = small
    # lm_head's trace is large next to its probe noise; a random-init block's trace can be ~0
    est = hutchinson(model, ["lm_head"], toks, probes=4000, batch=50, tol=0.1, min_probes=50, progress=False)
    assert 50 <= est.probes < 4000
    assert est.rel_se()["lm_head"] < 0.1


def test_chunks_estimate_the_same_trace(small):
    model, toks = small
    whole = hutchinson(model, [NAME], toks, probes=600, batch=100, progress=False)
    split = hutchinson(model, [NAME], toks, probes=600, batch=100, chunk=1, progress=False)
    se = (whole.trace_se[NAME] ** 2 + split.trace_se[NAME] ** 2) ** 0.5
    assert abs(whole.trace[NAME] - split.trace[NAME]) < 4 * se


def test_shared_probes_over_chunks_equal_one_graph_with_those_probes(small):
    """Sharing probes across chunks is exactly the whole-data estimator, whatever the chunking."""
    model, toks = small
    whole = hutchinson(model, [NAME], toks, probes=5, share_probes=True, seed=7, progress=False)
    split = hutchinson(model, [NAME], toks, probes=5, chunk=1, share_probes=True, seed=7, progress=False)
    assert split.trace[NAME] == pytest.approx(whole.trace[NAME], rel=1e-4)
    assert split.trace_se[NAME] == pytest.approx(whole.trace_se[NAME], rel=1e-4)
    torch.testing.assert_close(split.diag[NAME], whole.diag[NAME], rtol=1e-4, atol=1e-6)
    h = exact_hessian(model, toks, NAME)
    many = hutchinson(model, [NAME], toks, probes=400, chunk=1, share_probes=True, progress=False)
    assert abs(many.trace[NAME] - float(h.diagonal().sum())) < 4 * many.trace_se[NAME]


def test_hutchpp_is_exact_when_the_sketch_spans_the_tensor():
    """One tensor of n weights, sketch = n: Q spans everything, the residual is zero and
    tr(Q^T H Q) is the trace itself, whatever the probes."""
    from mpsearch.models.batches import LabelledBatches
    from mpsearch.primitives.hutchpp import hutchpp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    data = LabelledBatches(torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)), 8)
    w = model[2].weight.detach().clone()

    def loss(v):
        from torch.func import functional_call

        return data.loss(lambda x: functional_call(model, {"2.weight": v}, (x,)), range(2))

    exact = float(torch.autograd.functional.hessian(loss, w).reshape(8, 8).diagonal().sum())
    for seed in range(3):
        est = hutchpp(model, ["2"], data, sketch=8, probes=2, seed=seed)
        assert est.trace["2"] == pytest.approx(exact, rel=1e-6, abs=1e-9)


def test_hutchpp_is_unbiased_with_several_tensors(small):
    """Joint probes over two tensors (sign-randomised cross terms): the mean over seeds meets the exact trace."""
    import numpy as np

    from mpsearch.primitives.hutchpp import hutchpp

    model, toks = small
    names = [NAME, "model.layers.0.self_attn.q_proj"]
    h = exact_hessian(model, toks, NAME)
    runs = [hutchpp(model, names, toks, sketch=4, probes=4, seed=s).trace[NAME] for s in range(40)]
    mean, se = float(np.mean(runs)), float(np.std(runs, ddof=1) / np.sqrt(len(runs)))
    assert abs(mean - float(h.diagonal().sum())) < 4 * se + 1e-9
