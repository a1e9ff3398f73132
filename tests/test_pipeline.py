"""Primitives, proxy tables, allocation and evaluation on a tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpsearch.core.plan import Plan, fingerprint
from mpsearch.core.space import SearchSpace
from mpsearch.cost import decision_costs
from mpsearch.measure.evaluate import Evaluator
from mpsearch.primitives import PrimitiveError, compute_primitives
from mpsearch.proxies import load_proxy
from mpsearch.proxies.table import decision_losses, proxy_table
from mpsearch.quant import applied
from mpsearch.solvers import Problem, get_solver
from mpsearch.store.cache import cache_dir

from .conftest import layer_inputs

UP = "model.layers.0.mlp.up_proj"


def members(model):
    return [m.name for d in SearchSpace.from_file("llama").build(model) for m in d.members]


def test_fisher_is_mean_of_squared_per_sequence_gradients(model, tokens):
    prims = compute_primitives(model, [UP], tokens, {"fisher"}, use_cache=False, progress=False)
    w = dict(model.named_modules())[UP].weight
    w.requires_grad_(True)
    sq = torch.zeros_like(w)
    for seq in tokens:
        loss = model(input_ids=seq[None], labels=seq[None]).loss
        (g,) = torch.autograd.grad(loss, [w])
        sq += g**2
    w.requires_grad_(False)
    torch.testing.assert_close(prims.fisher[UP], sq / len(tokens), rtol=1e-4, atol=1e-12)
    assert not any(p.requires_grad for p in model.parameters())


def test_xtx_is_mean_input_second_moment(model, tokens):
    prims = compute_primitives(model, [UP], tokens, {"xtx"}, use_cache=False, progress=False)
    x = layer_inputs(model, tokens, UP)
    torch.testing.assert_close(prims.xtx[UP].double(), (x * x).mean(0), rtol=1e-5, atol=1e-9)


def test_primitive_cache_is_reused_and_corruption_recovers(model, tokens):
    names = members(model)
    a = compute_primitives(model, names, tokens, {"fisher"}, progress=False)
    files = list((cache_dir() / "primitives").glob("*.safetensors"))
    assert len(files) == 1
    b = compute_primitives(model, names, tokens, {"fisher"}, progress=False)
    assert all(torch.equal(a.fisher[n], b.fisher[n]) for n in names)
    files[0].write_bytes(b"garbage")
    c = compute_primitives(model, names, tokens, {"fisher"}, progress=False)
    assert all(torch.allclose(a.fisher[n], c.fisher[n]) for n in names)


def test_nan_statistics_are_named(model, tokens):
    with torch.no_grad():
        dict(model.named_modules())["model.layers.1.mlp.down_proj"].weight[0, 0] = float("nan")
    with pytest.raises(PrimitiveError, match="NaN"):
        compute_primitives(model, members(model), tokens, {"fisher"}, use_cache=False, progress=False)


@pytest.mark.parametrize("proxy", ["mse", "fisher", "input_moment"])
def test_proxy_table_milp_plan_apply_evaluate(model, tokens, proxy):
    space = SearchSpace.from_file("llama")
    decisions = space.build(model)
    p = load_proxy(proxy)
    prims = compute_primitives(model, [m.name for d in decisions for m in d.members], tokens, p.needs, progress=False)
    table = proxy_table(p, model, decisions, prims, progress=False)
    assert len(table) == sum(len(d.members) * len(d.formats) for d in decisions)
    assert (table.loc[table.format == "fp16", "predicted"] == 0).all()
    # predicted loss falls with bits for a fixed group size
    one = table[(table.tensor == UP) & table.format.str.endswith("g32a")].sort_values("bits")
    assert np.all(np.diff(one.predicted.to_numpy()) < 0)
    losses, costs = decision_losses(table, decisions), decision_costs(decisions)
    numel = sum(d.numel for d in decisions)
    solver = get_solver("milp").solve(
        Problem.build(
            [d.name for d in decisions], [[f.key for f in d.formats] for d in decisions], losses, costs, 3.5 * numel
        )
    )
    assert solver.status_ == "optimal" and solver.cost_ <= 3.5 * numel * (1 + 1e-9)
    formats = {m.name: d.formats[j] for d, j in zip(decisions, solver.choice_) for m in d.members}
    tied = [formats[f"model.layers.0.self_attn.{x}_proj"] for x in "qkv"]
    assert tied[0] == tied[1] == tied[2]
    plan = Plan("tiny", fingerprint(model), {n: {"weight": f} for n, f in formats.items()}, {}, {}, {})
    ev = Evaluator(tokens, progress=False).fit(model)
    assert ev.score(model).kl == pytest.approx(0.0, abs=1e-4)
    with applied(model, plan):
        q = ev.score(model)
    assert q.kl > 0 and np.isfinite(q.ppl)


def test_caches_are_keyed_by_weight_values_not_just_shapes(tokens):
    from mpsearch.core.plan import fingerprint as fp

    from .conftest import tiny_llama

    a, b = tiny_llama(seed=0), tiny_llama(seed=5)
    assert fp(a) == fp(b)
    ka = compute_primitives(a, [UP], tokens, {"fisher"}, progress=False).key
    kb = compute_primitives(b, [UP], tokens, {"fisher"}, progress=False).key
    assert ka != kb


def test_proxy_table_cache_round_trips(model, tokens):
    from mpsearch.run.cached import cached_proxy_table

    decisions = SearchSpace.from_file("llama").build(model)
    prims = compute_primitives(
        model, [m.name for d in decisions for m in d.members], tokens, {"fisher"}, progress=False
    )
    first = cached_proxy_table(load_proxy("fisher"), model, decisions, prims, progress=False)
    again = cached_proxy_table(load_proxy("fisher"), model, decisions, prims, progress=False)
    assert len(list((cache_dir() / "tables").glob("*.csv"))) == 1
    assert np.allclose(first.predicted, again.predicted, rtol=1e-12) and list(first.format) == list(again.format)
