"""Baselines in our plan format: uniform plans and the llama.cpp-style recipe."""

from __future__ import annotations

import pytest

from mpsearch.core.format import Format
from mpsearch.core.space import SearchSpace
from mpsearch.cost import Budget, plan_bits
from mpsearch.solvers.baselines import natural_recipe, recipe_formats, recipe_split, uniform_formats, use_more_bits

from .conftest import tiny_llama


def test_use_more_bits_matches_llama_cpp_for_30_layers():
    more = [i for i in range(30) if use_more_bits(i, 30)]
    # first eighth (30 // 8 = 3 layers), last eighth (from 7 * 30 // 8 = 26), every third between
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(layers=8)
    space = SearchSpace.from_file("llama")
    decisions = space.build(model)
    return space, decisions, [m for d in decisions for m in d.members]


def test_recipe_gives_v_and_down_more_bits_in_chosen_layers(setup):
    space, decisions, members = setup
    more = recipe_split(members)
    layers = sorted({int(n.split(".")[2]) for n in more})
    assert layers == [i for i in range(8) if use_more_bits(i, 8)]
    assert all(n.endswith(("self_attn.v_proj", "mlp.down_proj")) for n in more)
    fmts = natural_recipe(decisions, space.base_format, 4)
    assert {fmts[n].bits for n in more} == {6}
    assert {f.bits for n, f in fmts.items() if n not in more} == {4}
    assert Budget.parse("recipe:4", decisions, space.base_format).limit == pytest.approx(plan_bits(fmts, members))


@pytest.mark.parametrize("budget", [3.5, 4.5, 5.2])
def test_matched_recipe_fits_the_budget_and_spends_most_of_it(setup, budget):
    space, decisions, members = setup
    fmts = recipe_formats(decisions, budget, space.candidate_formats())
    bits = plan_bits(fmts, members)
    assert bits <= budget + 1e-9
    assert len({f for f in fmts.values()}) == 2


def test_matched_recipe_is_none_below_every_pair(setup):
    space, decisions, _ = setup
    assert recipe_formats(decisions, 2.0, space.candidate_formats()) is None


def test_uniform_rejects_a_group_that_does_not_fit(setup):
    _, decisions, members = setup
    assert plan_bits(uniform_formats(decisions, Format(3, 64)), members) == pytest.approx(3.5)
    with pytest.raises(ValueError, match="does not divide"):
        uniform_formats(decisions, Format(3, 128))
