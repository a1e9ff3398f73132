"""Fuzzing the files a user hands mpsearch (issue 32): random plans, search spaces and proxy files,
through the real command line.

Every case is invalid by construction (deep nesting, wrong types, out-of-range numbers, unknown
keys and names, binary or truncated text, oversized strings), and each must end as one line on
stderr with exit 2: no traceback, nothing written outside ``--out``. Cases whose validity is
not known in advance (random regexes as plan keys and space targets) may also succeed; they must
not hang. A case that runs past :data:`CASE_S` ends the whole test run with every thread's
traceback (``faulthandler``), so a hang can never pass.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpsearch.cli import main
from mpsearch.core.format import Format
from mpsearch.core.plan import FORMAT_ID, Plan, fingerprint
from mpsearch.core.registry import names
from tests.conftest import tiny_llama, tiny_tokenizer

#: seconds one case may take (they take milliseconds, a model-loading one under a second)
CASE_S = 30
Q = "model.layers.0.self_attn.q_proj"


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A root folder (the cwd of every case), a tiny model folder, a plan for it and an empty cache."""
    root = tmp_path_factory.mktemp("fuzz")
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    (root / "cache").mkdir()
    return root, fingerprint(model)


def snapshot(root: Path, out: Path) -> set[tuple[str, int]]:
    return {(str(p), p.stat().st_size) for p in root.rglob("*") if out not in p.parents and p != out and p.is_file()}


def run_case(world, argv_of, body: bytes, suffix: str, ok=(2,)) -> None:
    """Write ``body`` as the input file, run ``argv_of(input, out)``, and check how it ended."""
    root, _ = world
    path, out = root / f"input{suffix}", root / "out"
    path.write_bytes(body)
    before, slash = snapshot(root, out), set(os.listdir("/"))
    err, cwd = io.StringIO(), os.getcwd()
    os.chdir(root)
    faulthandler.dump_traceback_later(CASE_S, exit=True)  # a hang: every thread's traceback, and the run ends
    try:
        with (
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(io.StringIO()),
            pytest.MonkeyPatch.context() as mp,
        ):
            mp.setenv("MPSEARCH_CACHE", str(root / "cache"))
            rc = main(argv_of(str(path), str(out)))
    finally:
        faulthandler.cancel_dump_traceback_later()
        os.chdir(cwd)
    text = err.getvalue()
    assert rc in ok, (rc, text, body[:300])
    if rc == 2:
        assert text.count("\n") == 1 and text.startswith("mpsearch ") and "Traceback" not in text, text
    after = snapshot(root, out) - {(str(path), len(body))}
    assert after == before - {(str(path), len(body))}, after ^ before
    assert set(os.listdir("/")) == slash


# ------------------------------------------------------------------ strategies
json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
any_json = st.recursive(
    json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20
)


#: nesting past the limit: just past it, and past what a recursive parser survives
depths = st.one_of(st.integers(33, 200), st.integers(1000, 5000))


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def base_plan(fp: str) -> dict:
    return Plan(
        "tiny", fp, {Q: {"weight": Format(4, 32)}, "model.layers.1.mlp.down_proj": {"weight": Format(3, 64)}}
    ).to_dict()


bad_bits = st.one_of(
    st.integers().filter(lambda b: not 1 <= b <= 16),
    st.floats(),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
bad_group = st.one_of(
    st.integers(max_value=0).filter(lambda g: g != -1), st.floats(), st.text(max_size=5), st.booleans()
)
bad_quantizer = st.text(max_size=12).filter(lambda q: q not in names("quantizer"))
bad_param_key = st.text(min_size=1, max_size=10).filter(
    lambda k: k not in {"outliers", "damp", "block", "act_order", "clip"}
)


@st.composite
def bad_plans(draw, fp: str) -> bytes:
    """A plan file wrong in one drawn way."""
    plan = base_plan(fp)
    fmt = plan["tensors"][Q]["weight"]
    kind = draw(
        st.sampled_from(
            [
                "random",
                "deep",
                "bits",
                "group",
                "quantizer",
                "param",
                "top",
                "target",
                "format",
                "model",
                "truncated",
                "binary",
                "long_name",
                "nan",
            ]
        )
    )
    if kind == "random":
        return json.dumps(draw(any_json)).encode()
    if kind == "deep":
        where = draw(st.sampled_from(["provenance", "metrics", "budget"]))
        text = json.dumps(plan)
        return text.replace(f'"{where}": {{}}', f'"{where}": {{"x": {nested(draw(depths))}}}', 1).encode()
    if kind == "bits":
        fmt["bits"] = draw(bad_bits)
    elif kind == "group":
        fmt["group_size"] = draw(bad_group)
    elif kind == "quantizer":
        fmt["quantizer"] = draw(bad_quantizer)
    elif kind == "param":
        fmt["params"] = {draw(bad_param_key): draw(json_leaf)}
    elif kind == "top":
        plan[
            draw(
                st.text(min_size=1, max_size=10).filter(
                    lambda k: k not in plan and k not in {"importance", "calibration"}
                )
            )
        ] = draw(any_json)
    elif kind == "target":
        plan["tensors"][Q][
            draw(st.text(max_size=10).filter(lambda t: t not in ("weight", "input", "k_cache", "v_cache")))
        ] = None
    elif kind == "format":
        plan["format"] = draw(st.text(max_size=30).filter(lambda f: f != FORMAT_ID))
    elif kind == "model":
        plan["model"] = draw(
            any_json.filter(
                lambda m: (
                    not (isinstance(m, dict) and isinstance(m.get("id"), str) and isinstance(m.get("fingerprint"), str))
                )
            )
        )
    elif kind == "truncated":
        text = json.dumps(plan)
        return text[: draw(st.integers(0, len(text) - 1))].encode()
    elif kind == "binary":
        return draw(st.binary(min_size=1, max_size=200).filter(lambda b: _not_utf8(b)))
    elif kind == "long_name":
        plan["tensors"]["x" * draw(st.integers(1001, 5000))] = {"weight": fmt}
    elif kind == "nan":
        return (
            json.dumps(plan)
            .replace('"bits": 4', f'"bits": {draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"]))}')
            .encode()
        )
    return json.dumps(plan).encode()


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


#: regex pieces that nest quantifiers (the backtracking kind) and plain ones
regex_atoms = st.sampled_from(
    [".", "a", "q_proj", r"\.", "[0-9]", "(.|.)", "(a|a)", "(.*)", r"\d", "layers", "(x+x+)", "[^.]"]
)
regexes = st.lists(
    st.tuples(regex_atoms, st.sampled_from(["", "*", "+", "?", "{2,}", "{3}"])), min_size=1, max_size=6
).map(lambda parts: "".join(a + q for a, q in parts))


@given(data=st.data())
@fuzz(150)
def test_bad_plan_files_are_one_line_and_exit_2(world, data):
    body = data.draw(bad_plans(world[1]))
    run_case(world, lambda plan, out: ["heatmap", plan, "--out", f"{out}/h.png"], body, ".json")


@given(pattern=regexes, end=st.sampled_from(["", "!", "[0-9]{3}", "z$"]))
@fuzz(25)
def test_random_regex_plan_keys_never_hang(world, pattern, end):
    """Through a command that loads the model and resolves the patterns (a match may well be valid: exit 0 or 2)."""
    plan = base_plan(world[1])
    plan["tensors"] = {f"re:{pattern}{end}": {"weight": Format(4, 32).to_dict()}}
    run_case(
        world,
        lambda p, out: [
            "export",
            p,
            "--quiet",
            "--to",
            "compressed-tensors",
            "--model",
            str(world[0] / "tiny"),
            "--out",
            f"{out}/c.json",
        ],
        json.dumps(plan).encode(),
        ".json",
        ok=(0, 2),
    )


#: the keys a proxy file may hold; any other is refused
KNOWN_KEYS = ("name", "expression", "description")
BASE_SPACE = 'name = "s"\ntargets = ["re:.*layers.*"]\n[formats]\nbits = [3, 4]\ngroup_sizes = [32]\n'


@st.composite
def bad_spaces(draw) -> bytes:
    kind = draw(
        st.sampled_from(
            [
                "deep",
                "bits",
                "group",
                "unknown",
                "targets_type",
                "bad_regex",
                "binary",
                "truncated",
                "quantizer",
                "empty",
                "rule",
            ]
        )
    )
    if kind == "deep":
        return (BASE_SPACE.replace("bits = [3, 4]", f"bits = {nested(draw(depths), '3')}")).encode()
    if kind == "bits":
        v = draw(
            st.one_of(
                st.integers().filter(lambda b: not 1 <= b <= 15),
                st.text(max_size=4),
                st.booleans(),
                st.floats(allow_nan=False),
            )
        )
        return BASE_SPACE.replace("bits = [3, 4]", f"bits = [{_toml(v)}]").encode()
    if kind == "group":
        return BASE_SPACE.replace(
            "group_sizes = [32]", f"group_sizes = [{_toml(draw(bad_group.filter(lambda g: g == g)))}]"
        ).encode()
    if kind == "unknown":
        key = draw(
            st.from_regex(r"[a-z_]{1,10}", fullmatch=True).filter(
                lambda k: (
                    k not in {"name", "description", "types", "targets", "ignore", "tie", "rules", "input", "kv_cache"}
                )
            )
        )
        return (f"{key} = 1\n" + BASE_SPACE).encode()
    if kind == "targets_type":
        return BASE_SPACE.replace(
            'targets = ["re:.*layers.*"]', f"targets = {_toml(draw(st.one_of(st.integers(), st.text(max_size=5))))}"
        ).encode()
    if kind == "bad_regex":
        return BASE_SPACE.replace(
            "re:.*layers.*", "re:" + draw(st.sampled_from(["((", "[", "*a", "(?<", "a{2,1}", "(?P<1>x)"]))
        ).encode()
    if kind == "binary":
        return draw(st.binary(min_size=1, max_size=100).filter(_not_utf8))
    if kind == "truncated":  # cut just after an "=" or a "[": an unfinished value or table
        return BASE_SPACE[: draw(st.sampled_from([i + 1 for i, c in enumerate(BASE_SPACE) if c in "=["]))].encode()
    if kind == "quantizer":
        q = draw(st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(lambda q: q not in names("quantizer")))
        return (BASE_SPACE + f'quantizer = "{q}"\n').encode()
    if kind == "empty":
        return BASE_SPACE.replace(
            draw(st.sampled_from(["bits = [3, 4]", "group_sizes = [32]"])),
            draw(st.sampled_from(["bits = []", "group_sizes = []"])),
        ).encode()
    bits = _toml(draw(bad_bits.filter(lambda b: b is not None and b == b)))
    return BASE_SPACE.replace("[formats]", f"rules = [{{match = 're:.*', min_bits = {bits}}}]\n[formats]").encode()


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, float) and v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


@given(body=bad_spaces())
@fuzz(60)
def test_bad_space_files_are_one_line_and_exit_2(world, body):
    run_case(
        world,
        lambda space, out: ["search", "--quiet", "--space", space, "--model", str(world[0] / "tiny"), "--out", out],
        body,
        ".toml",
    )


@given(pattern=regexes, field=st.sampled_from(["targets", "ignore"]))
@fuzz(10)
def test_random_regex_space_targets_never_hang(world, pattern, field):
    """Through ``apply`` with a ``_default`` plan, which builds the space on the model to find what ``_default``
    reaches."""
    targets = (
        f'targets = ["re:{pattern}"]'
        if field == "targets"
        else f'targets = ["re:.*layers.*"]\nignore = ["re:{pattern}"]'
    )
    space = BASE_SPACE.replace('targets = ["re:.*layers.*"]', targets).replace("\\", "\\\\")
    plan = Plan("tiny", world[1], {"_default": {"weight": Format(4, 32)}})
    (world[0] / "default.json").write_text(
        json.dumps(plan.to_dict())
    )  # a pattern plan (save() writes resolved ones only)
    run_case(
        world,
        lambda s, out: [
            "apply",
            str(world[0] / "default.json"),
            "--quiet",
            "--space",
            s,
            "--model",
            str(world[0] / "tiny"),
            "--out",
            out,
        ],
        space.encode(),
        ".toml",
        ok=(0, 2),
    )


@st.composite
def bad_proxies(draw) -> bytes:
    kind = draw(
        st.sampled_from(
            [
                "name",
                "long_name",
                "big_number",
                "deep",
                "unknown_name",
                "forbidden",
                "key",
                "type",
                "empty",
                "long",
                "binary",
            ]
        )
    )
    name, expr = "p", "fisher * dw"
    if kind == "name":
        name = draw(st.text(min_size=1, max_size=20).filter(lambda n: not _proxy_name(n)))
    elif kind == "long_name":
        name = "p" * draw(st.integers(65, 400))
    elif kind == "big_number":
        expr = f"{'9' * draw(st.integers(310, 1990))} * fisher"
    elif kind == "deep":
        expr = "(" * draw(st.integers(65, 900)) + "fisher" + ")" * 900
    elif kind == "unknown_name":
        expr = draw(st.from_regex(r"[a-z]{3,8}", fullmatch=True).filter(lambda n: not _known(n))) + " * fisher"
    elif kind == "forbidden":
        expr = draw(
            st.sampled_from(
                [
                    "__import__('os')",
                    "fisher.real",
                    "fisher[0]",
                    "lambda: 1",
                    "[fisher]",
                    "fisher if 1 else 2",
                    "'a'",
                    "fisher @ fisher",
                    "f'{fisher}'",
                    "(x := 1)",
                ]
            )
        )
    elif kind == "key":
        key = draw(st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(lambda k: k not in KNOWN_KEYS))
        return f'name = "p"\nexpression = "fisher"\n{key} = "x"\n'.encode()
    elif kind == "type":
        return (
            'name = "p"\nexpression = '
            f"{_toml(draw(st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), max_size=2))))}\n"
        ).encode()
    elif kind == "empty":
        expr = draw(st.sampled_from(["", "   "]))
    elif kind == "long":
        expr = " + ".join(["fisher"] * 400)
    else:
        return draw(st.binary(min_size=1, max_size=100).filter(_not_utf8))
    return f"name = {json.dumps(name)}\nexpression = {json.dumps(expr)}\n".encode()


def _proxy_name(n: str) -> bool:
    from mpsearch.proxies.proxy import NAME

    return NAME.fullmatch(n) is not None


def _known(n: str) -> bool:
    from mpsearch.proxies.proxy import PRIMITIVE_NAMES

    return n in PRIMITIVE_NAMES


@given(body=bad_proxies())
@fuzz(60)
def test_bad_proxy_files_are_one_line_and_exit_2(world, body):
    run_case(
        world,
        lambda proxy, out: ["search", "--quiet", "--proxy", proxy, "--model", str(world[0] / "tiny"), "--out", out],
        body,
        ".toml",
    )
