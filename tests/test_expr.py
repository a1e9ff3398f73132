"""Tests for the proxy expression language and proxy files."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mpsearch.proxies import (
    PRIMITIVE_NAMES,
    Expression,
    ExpressionError,
    Proxy,
    ProxyFileError,
    list_proxies,
    load_proxy,
    parse,
)
from mpsearch.proxies.expr import FUNCTIONS


def make_env(seed: int = 0, out: int = 5, inp: int = 7) -> dict[str, torch.Tensor | float]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    dw = 0.01 * torch.randn(out, inp, generator=g)
    return {
        "w": w,
        "dw": dw,
        "fisher": torch.rand(out, inp, generator=g),
        "xtx": torch.rand(inp, generator=g),
        "numel": float(w.numel()),
        "bits": 4.25,
        "qerr": float((dw**2).sum()),
    }


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


# ---------------------------------------------------------------- built-in proxies


def test_builtins_listed() -> None:
    assert {"mse", "fisher", "input_moment"} <= set(list_proxies())
    assert list_proxies() == sorted(list_proxies())


@pytest.mark.parametrize(
    "name, direct",
    [
        ("mse", lambda e: (e["dw"] ** 2).sum()),
        ("fisher", lambda e: 0.5 * (e["fisher"] * e["dw"] ** 2).sum()),
        ("input_moment", lambda e: (e["xtx"] * e["dw"] ** 2).sum()),
    ],
)
def test_builtin_proxy_matches_torch(name: str, direct) -> None:
    proxy = load_proxy(name)
    assert proxy.name == name
    assert proxy.description
    assert proxy.needs <= PRIMITIVE_NAMES
    for seed in range(3):
        env = make_env(seed)
        got = proxy.expression.evaluate(env)
        assert isinstance(got, float)
        assert close(got, float(direct(env)))
        assert proxy.evaluate(env) == got


def test_load_proxy_by_path_and_unknown(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text('name = "mine"\nexpression = "sum(abs(dw))"\n')
    p = load_proxy(str(f))
    assert p.name == "mine" and p.description == "" and p.needs == {"dw"}
    with pytest.raises(ProxyFileError, match="built-in proxies: .*mse"):
        load_proxy("no_such_proxy")


def test_needs_and_from_string() -> None:
    p = Proxy.from_string("p", "sum(fisher * dw**2) / numel + bits")
    assert p.needs == frozenset({"fisher", "dw", "numel", "bits"})
    with pytest.raises(ExpressionError, match="unknown name 'h'"):
        Proxy.from_string("p", "sum(h)")


# ---------------------------------------------------------------- operators and functions

OPERATOR_CASES = [
    ("sum(w + dw)", lambda e: (e["w"] + e["dw"]).sum()),
    ("sum(w - dw)", lambda e: (e["w"] - e["dw"]).sum()),
    ("sum(w * dw)", lambda e: (e["w"] * e["dw"]).sum()),
    ("sum(w / (fisher + 1))", lambda e: (e["w"] / (e["fisher"] + 1)).sum()),
    ("sum(fisher ** 0.5)", lambda e: (e["fisher"] ** 0.5).sum()),
    ("sum(-w)", lambda e: (-e["w"]).sum()),
    ("sum(+w)", lambda e: e["w"].sum()),
    ("2 ** bits", lambda e: 2 ** e["bits"]),
    ("numel * bits - 3 / 4", lambda e: e["numel"] * e["bits"] - 0.75),
    ("qerr", lambda e: e["qerr"]),
    ("1 + 2 * 3", lambda e: 7.0),
    ("-2 ** 2", lambda e: -4.0),
    ("sum(xtx * w)", lambda e: (e["xtx"] * e["w"]).sum()),
]

FUNCTION_CASES = [
    ("sum(abs(w))", lambda e: e["w"].abs().sum()),
    ("sum(sqrt(fisher))", lambda e: e["fisher"].sqrt().sum()),
    ("sum(log(fisher + 1))", lambda e: (e["fisher"] + 1).log().sum()),
    ("sum(exp(dw))", lambda e: e["dw"].exp().sum()),
    ("sum(square(w))", lambda e: e["w"].square().sum()),
    ("sum(sign(w))", lambda e: e["w"].sign().sum()),
    ("sum(w)", lambda e: e["w"].sum()),
    ("mean(w)", lambda e: e["w"].mean()),
    ("norm(w)", lambda e: torch.sqrt((e["w"] ** 2).sum())),
    ("sum(sigmoid(w))", lambda e: (1 / (1 + (-e["w"]).exp())).sum()),
    ("sum(tanh(w))", lambda e: e["w"].tanh().sum()),
    ("sum(reciprocal(fisher + 1))", lambda e: (1 / (e["fisher"] + 1)).sum()),
    ("sum(minmax(w) * dw)", lambda e: ((e["w"] - e["w"].min()) / (e["w"].max() - e["w"].min()) * e["dw"]).sum()),
    ("max(minmax(w))", lambda e: 1.0),
    ("sum(softmax(w))", lambda e: 1.0),
    ("sum(softmax(w) * w)", lambda e: ((e["w"].exp() / e["w"].exp().sum()) * e["w"]).sum()),
    ("max(w)", lambda e: e["w"].max()),
    ("min(w)", lambda e: e["w"].min()),
    (
        "sum(normalize(fisher) * dw**2)",
        lambda e: (e["fisher"] / (e["fisher"].abs().mean() + 1e-12) * e["dw"] ** 2).sum(),
    ),
    ("sum(minimum(w, dw))", lambda e: torch.minimum(e["w"], e["dw"]).sum()),
    ("sum(maximum(w, 0))", lambda e: e["w"].clamp(min=0).sum()),
    ("sqrt(bits)", lambda e: math.sqrt(e["bits"])),
    ("abs(-bits)", lambda e: e["bits"]),
]


@pytest.mark.parametrize("text, direct", OPERATOR_CASES + FUNCTION_CASES)
def test_operators_and_functions_match_torch(text: str, direct) -> None:
    env = make_env(1)
    got = parse(text, PRIMITIVE_NAMES).evaluate(env)
    assert close(got, float(direct(env)))


def test_every_function_is_covered() -> None:
    used = {t.split("(")[0] for t, _ in FUNCTION_CASES}
    used |= {
        "abs",
        "normalize",
        "minimum",
        "maximum",
        "sqrt",
        "log",
        "exp",
        "square",
        "sign",
        "sigmoid",
        "tanh",
        "reciprocal",
        "minmax",
        "softmax",
    }
    assert set(FUNCTIONS) == {
        "abs",
        "sqrt",
        "log",
        "exp",
        "square",
        "sign",
        "sum",
        "mean",
        "norm",
        "max",
        "min",
        "normalize",
        "minimum",
        "maximum",
        "sigmoid",
        "tanh",
        "reciprocal",
        "minmax",
        "softmax",
    }
    assert set(FUNCTIONS) <= used


def test_expression_basics() -> None:
    e = parse("  sum(fisher * dw**2)  ", PRIMITIVE_NAMES)
    assert isinstance(e, Expression)
    assert str(e) == e.text == "sum(fisher * dw**2)"
    assert e.names == frozenset({"fisher", "dw"})
    assert parse("1 + 2", PRIMITIVE_NAMES).names == frozenset()
    assert e == parse("sum(fisher * dw**2)", ["fisher", "dw"])
    env = make_env(2)
    assert pickle.loads(pickle.dumps(e)).evaluate(env) == e.evaluate(env)


def test_allowed_names_come_from_caller() -> None:
    e = parse("sum(h * dw**2)", {"h", "dw"})
    assert e.names == {"h", "dw"}
    with pytest.raises(ExpressionError, match="unknown name 'w'.*known names: dw, h"):
        parse("sum(w)", {"h", "dw"})


def test_low_precision_and_int_inputs() -> None:
    dw = torch.full((64, 64), 0.01, dtype=torch.bfloat16)
    got = parse("sum(dw**2)", {"dw"}).evaluate({"dw": dw})
    assert close(got, 64 * 64 * float(torch.tensor(0.01, dtype=torch.bfloat16)) ** 2, rel=1e-4)
    assert parse("mean(w)", {"w"}).evaluate({"w": torch.arange(4)}) == 1.5


# ---------------------------------------------------------------- rejections

REJECTIONS = [
    ("__import__('os')", "unknown function '__import__'"),
    ("w.sum()", "attribute access"),
    ("w.T", "attribute access"),
    ("w[0]", "subscript"),
    ("open('x')", "unknown function 'open'"),
    ("lambda: 1", "lambda"),
    ("[x for x in w]", "comprehension"),
    ("(x for x in w)", "comprehension"),
    ("w if w else w", "conditional expression"),
    ("w > 0", "comparison"),
    ("w and dw", "boolean operator"),
    ("not w", "'not'"),
    ("~w", "'~'"),
    ("w // 2", "'//'"),
    ("w % 2", "'%'"),
    ("w @ w", "'@'"),
    ('"abc"', "string constant"),
    ("f'{w}'", "f-string"),
    ("[w, dw]", "list literal"),
    ("(w, dw)", "tuple literal"),
    ("sum(w, dim=0)", "keyword arguments"),
    ("sum(*w)", "starred"),
    ("sum(w, dw)", "takes 1 argument, got 2"),
    ("minimum(w)", "takes 2 arguments, got 1"),
    ("foo(w)", "unknown function 'foo'"),
    ("w(dw)", "unknown function 'w'"),
    ("sum(w)(dw)", "only plain function names"),
    ("unknown_name", "unknown name 'unknown_name'"),
    ("", "empty"),
    ("   ", "empty"),
    ("1 +", "syntax error at column"),
    ("sum(w", "syntax error at column"),
    ("w = 1", "syntax error at column"),
    ("True", "boolean constant"),
    ("None", "NoneType constant"),
    ("1j", "complex constant"),
    ("w + " * 600 + "w", "too long"),
    ("(" * 100 + "w" + ")" * 100, "nesting depth"),
    ("-(" * 100 + "w" + ")" * 100, "nesting depth"),
    ("-" * 100 + "w", "nesting depth"),
    ("sum(" * 70 + "w" + ")" * 70, "nesting depth"),
    ("+".join(["w"] * 80), "nesting depth"),
]


@pytest.mark.parametrize("text, fragment", REJECTIONS)
def test_rejections(text: str, fragment: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse(text, PRIMITIVE_NAMES)
    assert fragment in str(info.value)


@pytest.mark.parametrize("text", ["foo(w)", "unknown_name"])
def test_unknown_lists_known(text: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse(text, PRIMITIVE_NAMES)
    msg = str(info.value)
    assert repr(text) in msg
    assert ("normalize" in msg) if "(" in text else ("fisher" in msg and "xtx" in msg)


def test_syntax_error_mentions_text_and_column() -> None:
    with pytest.raises(ExpressionError, match=r"column \d+.*'1 \+'"):
        parse("1 +", PRIMITIVE_NAMES)


def test_depth_limit_boundary() -> None:
    parse("(" * 64 + "w" + ")" * 64, PRIMITIVE_NAMES)
    parse("-" * 63 + "w", PRIMITIVE_NAMES)


def test_non_scalar_result() -> None:
    e = parse("fisher * dw**2", PRIMITIVE_NAMES)
    with pytest.raises(ExpressionError, match=r"does not reduce to one number.*sum\(\.\.\.\)"):
        e.evaluate(make_env())


def test_missing_name_in_env() -> None:
    e = parse("sum(fisher * dw**2)", PRIMITIVE_NAMES)
    env = make_env()
    del env["fisher"]
    with pytest.raises(ExpressionError, match="'fisher' is missing"):
        e.evaluate(env)


def test_runtime_shape_error_is_expression_error() -> None:
    e = parse("sum(w * dw)", PRIMITIVE_NAMES)
    with pytest.raises(ExpressionError, match="failed"):
        e.evaluate({"w": torch.ones(3, 4), "dw": torch.ones(5)})


# ---------------------------------------------------------------- hypothesis

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
tensors = (
    st.tuples(st.integers(1, 6), st.integers(1, 6))
    .flatmap(lambda shape: arrays(np.float32, shape, elements=finite))
    .map(torch.from_numpy)
)


@settings(max_examples=60, deadline=None)
@given(tensors)
def test_hypothesis_sum_of_squares(dw: torch.Tensor) -> None:
    got = parse("sum(dw**2)", PRIMITIVE_NAMES).evaluate({"dw": dw})
    assert close(got, float((dw**2).sum()))
    assert parse("sum(abs(w))", PRIMITIVE_NAMES).evaluate({"w": dw}) >= 0


def _exprs() -> st.SearchStrategy[str]:
    leaves = st.one_of(
        st.sampled_from(sorted(PRIMITIVE_NAMES)),
        st.integers(0, 100).map(str),
        st.floats(0, 100, allow_nan=False).map(repr),
    )

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        unary = sorted(n for n, (k, _) in FUNCTIONS.items() if k == 1)
        binary = sorted(n for n, (k, _) in FUNCTIONS.items() if k == 2)
        return st.one_of(
            st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "**"]), inner).map(
                lambda t: f"({t[0]} {t[1]} {t[2]})"
            ),
            st.tuples(st.sampled_from(["-", "+"]), inner).map(lambda t: f"{t[0]}{t[1]}"),
            st.tuples(st.sampled_from(unary), inner).map(lambda t: f"{t[0]}({t[1]})"),
            st.tuples(st.sampled_from(binary), inner, inner).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        )

    return st.recursive(leaves, extend, max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(_exprs())
def test_hypothesis_round_trip(text: str) -> None:
    e = parse(text, PRIMITIVE_NAMES)
    again = parse(str(e), PRIMITIVE_NAMES)
    assert again.text == e.text and again.names == e.names and again == e
    assert e.names <= PRIMITIVE_NAMES


# ---------------------------------------------------------------- proxy files


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('name = "x"\nexpression = "sum(dw**2)"\nweight = 2.0\n', "unknown key 'weight'"),
        ('name = "x"\ndescription = "d"\n', "missing key 'expression'"),
        ('expression = "sum(dw**2)"\n', "missing key 'name'"),
        ('name = "x"\nexpression = "sum(dw**2\n', "malformed TOML"),
        ('name = "x"\nexpression = sum(dw**2)\n', "malformed TOML"),
        ('name = "x"\nexpression = 3\n', "must be a string"),
        ('name = "x"\nexpression = "sum(h)"\n', "unknown name 'h'"),
    ],
)
def test_proxy_file_errors(tmp_path: Path, content: str, fragment: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(content)
    with pytest.raises(ProxyFileError) as info:
        Proxy.from_file(f)
    assert fragment in str(info.value)
    assert str(f) in str(info.value)


def test_proxy_file_missing(tmp_path: Path) -> None:
    f = tmp_path / "absent.toml"
    with pytest.raises(ProxyFileError, match="absent.toml"):
        Proxy.from_file(f)
