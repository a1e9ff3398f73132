"""Search space from a file: decisions, ties, group fitting, rules, budgets."""

from __future__ import annotations

import pytest

from mpsearch.core.format import Format
from mpsearch.core.space import Rule, SearchSpace, SpaceError
from mpsearch.cost import Budget, BudgetError, decision_costs, plan_bits
from mpsearch.run.session import check_budgets


@pytest.fixture
def space():
    return SearchSpace.from_file("llama")


def test_builtin_llama_space_ties_qkv_and_gate_up(space, model):
    decisions = space.build(model)
    assert len(decisions) == 2 * 4  # per layer: qkv, o, gate+up, down
    qkv = next(d for d in decisions if d.name == "tie:model.layers.0.self_attn")
    assert [m.name.rsplit(".", 1)[1] for m in qkv.members] == ["q_proj", "k_proj", "v_proj"]
    gu = next(d for d in decisions if d.name == "tie:model.layers.1.mlp")
    assert len(gu.members) == 2


def test_group_sizes_must_divide_input(model):
    space = SearchSpace.from_dict({"targets": [r"re:.*_proj"], "formats": {"bits": [4], "group_sizes": [48, 128]}})
    decisions = {d.name: d for d in space.build(model)}
    # in=64 (q/k/v/o/gate/up): 48 and 128 do not divide -> only fp16 left; down_proj (in=128): 128 fits
    assert [f.key for f in decisions["model.layers.0.self_attn.q_proj"].formats] == ["fp16"]
    assert "u4g128a" in [f.key for f in decisions["model.layers.0.mlp.down_proj"].formats]


def test_rules_pin_bound_exclude(space, model):
    s = space.with_rules(
        [
            Rule(r"re:.*down_proj", min_bits=5),
            Rule("model.layers.0.self_attn.o_proj", pin=Format(8, 32)),
            Rule(r"re:model\.layers\.1\.self_attn\.o_proj", exclude=True),
            Rule(r"re:.*\.mlp\.(gate|up)_proj", max_bits=3),
        ]
    )
    d = {x.name: x for x in s.build(model)}
    assert all(f.bits >= 5 for f in d["model.layers.0.mlp.down_proj"].formats)
    assert [f.key for f in d["model.layers.0.self_attn.o_proj"].formats] == ["u8g32a"]
    assert "model.layers.1.self_attn.o_proj" not in d
    assert all(f.bits <= 3 for f in d["tie:model.layers.0.mlp"].formats)


def test_cli_rules(space, model):
    base = space.base_format
    rules = [
        Rule.parse_cli("pin", r"re:.*down_proj=6:32", base),
        Rule.parse_cli("max_bits", r"re:.*o_proj=4", base),
        Rule.parse_cli("exclude", "model.layers.0.mlp.down_proj", base),
    ]
    d = {x.name: x for x in space.with_rules(rules).build(model)}
    assert [f.key for f in d["model.layers.1.mlp.down_proj"].formats] == ["u6g32a"]
    assert "model.layers.0.mlp.down_proj" not in d
    with pytest.raises(SpaceError, match="NAME=VALUE"):
        Rule.parse_cli("pin", "no-equals-sign", base)


def test_rule_matching_nothing_is_an_error(space, model):
    with pytest.raises(SpaceError, match="matches no decision"):
        space.with_rules([Rule("model.layers.7.mlp.up_proj", min_bits=4)]).build(model)


def test_tie_with_conflicting_pin_is_an_error(space, model):
    with pytest.raises(SpaceError, match="share no candidate"):
        space.with_rules([Rule("model.layers.0.self_attn.q_proj", pin=Format(7, 32))]).build(model)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("name = 'x'\nbogus = 1", "bogus"),
        ("[formats]\nbits = [2, 99]", "bits"),
        ("tie = ['re:no_group']", "capture group"),
        ("[[rules]]\nmin_bits = 3", "match"),
        ("name = ", "TOML"),
    ],
)
def test_bad_space_files(tmp_path, text, needle):
    p = tmp_path / "s.toml"
    p.write_text(text)
    with pytest.raises(SpaceError, match=needle):
        SearchSpace.from_file(p)


def test_unknown_space_lists_builtins():
    with pytest.raises(SpaceError, match="llama"):
        SearchSpace.from_file("no-such-space")


def test_budgets_and_effective_bits(space, model):
    decisions = space.build(model)
    members = [m for d in decisions for m in d.members]
    numel = sum(m.numel for m in members)
    u3 = Budget.parse("uniform:3", decisions, space.base_format)
    assert u3.limit == pytest.approx(3.5)
    assert Budget.parse("uniform:4:32", decisions, space.base_format).limit == pytest.approx(5.0)
    assert Budget.parse("1.5KB", decisions, space.base_format).total_bits(numel) == 12_000
    assert plan_bits({m.name: Format(4, 32) for m in members}, members) == pytest.approx(5.0)
    costs = decision_costs(decisions)
    # cheapest: 2-bit g64 (2.5 bits) where in=64, 2-bit g128 (2.25 bits) on down_proj (in=128)
    down = sum(m.numel for m in members if m.name.endswith("down_proj"))
    smallest = (2.5 * (numel - down) + 2.25 * down) / numel
    assert sum(float(c.min()) for c in costs) / numel == pytest.approx(smallest)
    with pytest.raises(BudgetError, match=f"smallest feasible budget is {smallest:.4f}"):
        check_budgets([Budget("bits", 2.0)], costs, numel)
    with pytest.raises(BudgetError, match="cannot read budget"):
        Budget.parse("lots", decisions, space.base_format)


def test_a_listed_space_offers_each_type_only_where_its_block_tiles_the_row():
    from tests.conftest import tiny_llama

    model = tiny_llama(hidden=64, intermediate=256)  # down_proj rows are 256 wide, the rest 64
    decisions = SearchSpace.from_file("gguf").build(model)
    down = [d for d in decisions if d.name.endswith("down_proj")]
    other = [d for d in decisions if not d.name.endswith("down_proj")]
    assert down and all("q4_k" in {f.key for f in d.formats} for d in down)
    assert other and all(
        {f.key for f in d.formats} == {"q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "q8_0", "fp16"} for d in other
    )
    assert len(decisions) == 14  # no ties: q, k and v each take their own type


def test_a_listed_space_takes_key_pins_and_format_budgets_and_refuses_grid_budgets(model):
    space = SearchSpace.from_file("gguf").with_rules([Rule.parse_cli("pin", r"re:.*\.o_proj=q8_0", None)])
    decisions = space.build(model)
    assert all([f.key for f in d.formats] == ["q8_0"] for d in decisions if d.name.endswith("o_proj"))
    b = Budget.parse("uniform:q4_0", decisions, space.base_format)
    assert b.reference_name == "uniform-q4_0" and b.limit > 4.5  # the pinned o_proj costs 8.5
    with pytest.raises(BudgetError, match="lists its formats"):
        Budget.parse("uniform:3", decisions, space.base_format)
    with pytest.raises(SpaceError, match="pin one by key"):
        Rule.parse_cli("pin", "x=8", None)
    with pytest.raises(SpaceError, match="cannot be combined"):
        SearchSpace.from_dict({"formats": {"list": ["q4_0"], "bits": [4]}})
    with pytest.raises(SpaceError, match="not a format key"):
        SearchSpace.from_dict({"formats": {"list": ["q4k"]}})
