"""Hostile but realistic input (issue 32): every case is one clear line, exit 2, before heavy work;
nothing is written where it should not be; nothing is dropped silently; the same inputs give the
same files. Each test names the item of the issue it covers; each failed before its fix."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mpsearch.cli import main
from mpsearch.core.format import Format, FormatError
from mpsearch.core.plan import Plan, PlanError, fingerprint
from mpsearch.core.space import SearchSpace, SpaceError
from mpsearch.export import ExportError, export
from mpsearch.quant import apply_
from tests import confined
from tests.conftest import tiny_gguf, tiny_llama, tiny_text, tiny_tokenizer

Q = "model.layers.0.self_attn.q_proj"
CLI = [sys.executable, "-m", "mpsearch.cli"]


def one_line_error(rc: int, err: str, needle: str, cmd: str = "search") -> None:
    assert rc == 2, err
    assert err.startswith(f"mpsearch {cmd}: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err


def run_cli(argv, cache: Path, cwd: Path | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {"MPSEARCH_CACHE": str(cache), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cache.parent)}
    if kw:
        return confined.run([*CLI, *argv], env=env, cwd=cwd, timeout=timeout, **kw)
    return subprocess.run([*CLI, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def plan_file(tmp_path) -> Path:
    """A valid plan for a model that is never loaded (the checks before it are what is tested)."""
    p = tmp_path / "plan.json"
    Plan("x", "sha256:0", {Q: {"weight": Format(4, 32)}}).save(p)
    return p


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    tok = tiny_tokenizer()
    tiny_llama(vocab=len(tok)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(tiny_text(1))
    (tmp_path / "eval.txt").write_text(tiny_text(2))
    return tmp_path / "tiny"


def tiny_search_args(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    d = tiny_dir.parent
    return [
        "search",
        "--quiet",
        "--model",
        str(tiny_dir),
        "--calibration",
        str(d / "calib.txt"),
        "--evaluation",
        str(d / "eval.txt"),
        "--calib-chunks",
        "4",
        "--gram-chunks",
        "8",
        "--calib-seq-len",
        "32",
        "--eval-chunks",
        "2",
        "--eval-seq-len",
        "32",
        "--refine",
        "4",
        "--refine-chunks",
        "2",
        "--refine-seq-len",
        "32",
        "--no-tasks",
        "--no-profile",
        "--hardware",
        "t4",
        "--out",
        str(out),
        *extra,
    ]


# ------------------------------------------------------------------ 1. output paths, checked before any work
def test_search_out_at_the_root_writes_nothing_there(no_model_load, capsys):
    before = set(os.listdir("/"))
    one_line_error(main(["search", "--quiet", "--out", "/"]), capsys.readouterr().err, "is the filesystem root")
    assert set(os.listdir("/")) == before


@pytest.mark.parametrize("cmd", ["search", "evolve"])
def test_out_at_a_file_or_a_stranger_folder_is_refused_before_the_model_loads(cmd, tmp_path, no_model_load, capsys):
    (tmp_path / "file").write_text("x")
    one_line_error(main([cmd, "--quiet", "--out", str(tmp_path / "file")]), capsys.readouterr().err, "is a file", cmd)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    one_line_error(
        main([cmd, "--quiet", "--out", str(tmp_path / "theirs")]),
        capsys.readouterr().err,
        "not one mpsearch wrote",
        cmd,
    )
    assert sorted(os.listdir(tmp_path / "theirs")) == ["notes.txt"]


def test_a_folder_mpsearch_wrote_may_be_written_again(tmp_path, tiny_dir):
    """The marker lets a rerun into the same --out go on (and a search leaves it)."""
    out = tmp_path / "run"
    for _ in range(2):
        r = run_cli(tiny_search_args(tiny_dir, out, "--no-measure"), tmp_path / "cache")
        assert r.returncode == 0, r.stderr
    assert (out / ".mpsearch-output").exists() and (out / "plans").is_dir()


def test_out_in_a_read_only_folder_is_refused_at_once(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    t0 = time.time()
    r = run_cli(["search", "--quiet", "--out", str(ro / "run")], tmp_path / "cache", read_only=[ro])
    one_line_error(r.returncode, r.stderr, "cannot write in")
    assert time.time() - t0 < 30 and not (tmp_path / "cache" / "models").exists()  # before the model loads


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["apply", "{plan}", "--out", "{file}"], "is a file"),
        (["apply", "{plan}", "--out", "{theirs}"], "not one mpsearch wrote"),
        (["export", "{plan}", "--to", "gguf", "--out", "{dir}"], "is a folder"),
        (["heatmap", "{plan}", "--out", "{dir}"], "is a folder"),
        (["evolve-proxy", "gt.csv", "--out", "{dir}"], "is a folder"),
        (["profile-device", "--out", "{file}"], "is a file"),
    ],
)
def test_other_commands_check_their_output_before_any_work(argv, needle, tmp_path, plan_file, no_model_load, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.json").write_text("{}")  # someone's model folder: apply must not write over it
    spots = {"plan": plan_file, "file": tmp_path / "file", "dir": tmp_path / "dir", "theirs": tmp_path / "theirs"}
    rc = main([a.format(**spots) for a in argv])
    one_line_error(rc, capsys.readouterr().err, needle, argv[0])
    assert os.listdir(tmp_path / "dir") == [] and sorted(os.listdir(tmp_path / "theirs")) == ["config.json"]


# ------------------------------------------------------------------ 2. exports never drop outliers silently
@pytest.mark.parametrize("target", ["compressed-tensors", "gptqmodel", "autoround"])
def test_outliers_are_refused_by_the_integer_exporters_or_mapped_with_a_record(target, tiny_dir, tmp_path, caplog):
    model = tiny_llama(vocab=len(tiny_tokenizer()))
    odd = Format(4, 64, params=(("outliers", 0.01),))
    plan = Plan(
        "tiny", fingerprint(model), {Q: {"weight": odd}, "model.layers.0.mlp.up_proj": {"weight": Format(4, 64)}}
    )
    with pytest.raises(
        ExportError, match=r"q_proj'\]\.weight: format u4g64a\+o1 keeps 0.01 of its weights as fp16 outliers"
    ):
        export(plan, target, tmp_path / "x.json", model=str(tiny_dir))
    assert not (tmp_path / "x.json").exists()
    with caplog.at_level(logging.WARNING):
        export(plan, target, tmp_path / "x.json", model=str(tiny_dir), nearest=True)
    assert f"--nearest: {Q} u4g64a+o1 -> w4g64a" in caplog.text


# ------------------------------------------------------------------ 3. every file of a cached model is checked
@pytest.mark.parametrize("edit", ["config", "tokenizer", "extra"])
def test_an_edited_cached_model_folder_is_converted_again(edit, tmp_path, monkeypatch, caplog):
    from mpsearch.models import load_model

    monkeypatch.setenv("MPSEARCH_CACHE", str(tmp_path / "cache"))
    path = tiny_gguf(tmp_path / "tiny.gguf")
    eps = load_model(str(path)).model.config.rms_norm_eps
    (folder,) = (tmp_path / "cache" / "models").iterdir()
    if edit == "config":  # the case: every figure changed, with no warning
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-2}))
    elif edit == "tokenizer":
        tok = folder / "tokenizer" / "tokenizer.json"
        tok.write_text(tok.read_text().replace('"<unk>"', '"<junk>"', 1))
    else:
        (folder / "tokenizer" / "special_tokens_map.extra").write_text("{}")
    with caplog.at_level(logging.WARNING):
        lm = load_model(str(path))
    assert (
        "is unusable" in caplog.text
        and {
            "config": "config.json is altered",
            "tokenizer": "tokenizer.json is altered",
            "extra": "is not written by mpsearch",
        }[edit]
        in caplog.text
    )
    assert lm.model.config.rms_norm_eps == eps


# ------------------------------------------------------------------ 4. quantizer parameters, unquantized formats, NaN
# results
@pytest.mark.parametrize(
    "params,needle",
    [
        ({"damp": 1e308}, "damp"),
        ({"damp": float("nan")}, "damp"),
        ({"damp": 0}, "damp"),
        ({"damp": "0.1"}, "damp"),
        ({"block": 0}, "block"),
        ({"block": 2.5}, "block"),
        ({"act_order": 1}, "act_order"),
    ],
)
def test_gptq_params_are_checked_when_the_format_is_built(params, needle):
    with pytest.raises(FormatError, match=needle):
        Format.from_dict({"bits": 4, "group_size": 32, "quantizer": "gptq", "params": params})


def test_gptq_at_the_largest_damp_is_still_finite():
    from mpsearch.quant import quantize
    from mpsearch.quant.gptq import MAX_DAMP

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    q = quantize(w, Format(4, 32, quantizer="gptq", params=(("damp", MAX_DAMP),)), x.T @ x / 256)
    assert torch.isfinite(q).all()


def test_an_unquantized_format_is_sixteen_bits(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "format": "mpsearch.core.plan/v1",
                "model": {"id": "x", "fingerprint": "f"},
                "tensors": {Q: {"weight": {"quantizer": "none", "bits": 3}}},
            }
        )
    )
    with pytest.raises(PlanError, match="quantizer 'none' has a fixed layout .bits=16.; got bits=3"):
        Plan.load(path)


def test_a_quantizer_that_fails_names_its_tensor(model):
    """GPTQ on a Gram matrix of NaNs (say, from a corrupt importance file): the tensor and format, not a LinAlgError."""
    n = model.model.layers[0].self_attn.q_proj.in_features
    plan = Plan(
        "tiny",
        fingerprint(model),
        {Q: {"weight": Format(4, 32, quantizer="gptq")}},
        importance={Q: torch.full((n, n), math.nan)},
    )
    with pytest.raises(PlanError, match=r"q_proj'\]\.weight: gptq4g32a"):
        apply_(model, plan)


def test_a_nan_measurement_never_exits_0(tiny_dir, tmp_path, capsys):
    """A model whose output overflows: its plan measures NaN, and `eval` exits 1 saying so."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        m.model.norm.weight.fill_(float("inf"))
    m.save_pretrained(tiny_dir)
    plan = Plan("tiny", fingerprint(m), {Q: {"weight": Format(4, 32)}})
    plan.save(tmp_path / "p.json")
    rc = main(
        [
            "eval",
            str(tmp_path / "p.json"),
            "--quiet",
            "--model",
            str(tiny_dir),
            "--evaluation",
            str(tmp_path / "eval.txt"),
            "--eval-chunks",
            "1",
            "--eval-seq-len",
            "16",
        ]
    )
    said = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("mpsearch")
    ]  # (transformers' load bars aside)
    assert (
        rc == 1 and len(said) == 1 and said[0].startswith("mpsearch eval: error: measured NaN or infinite quality for")
    ), said


def test_nonfinite_plans_are_named():
    from mpsearch.run.search import nonfinite_plans

    t = pd.DataFrame({"plan": ["a", "b", "c"], "ppl": [1.0, math.nan, 2.0], "kl": [0.1, 0.2, math.inf]})
    assert nonfinite_plans(t) == ["b", "c"]


# ------------------------------------------------------------------ 5. unbounded and recursive input
def deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize(
    "text,needle",
    [
        (deep(200_000), "nests objects or arrays more than 32 levels deep"),
        (
            '{"format": "mpsearch.core.plan/v1", "model": {"id": "x", "fingerprint": "y"}, "tensors": {}, '
            '"provenance": ' + deep(40) + "}",
            "more than 32 levels",
        ),
    ],
)
def test_deeply_nested_plans_are_one_line(text, needle, tmp_path, capsys):
    (tmp_path / "p.json").write_text(text)
    one_line_error(
        main(["heatmap", str(tmp_path / "p.json"), "--out", str(tmp_path / "h.png")]),
        capsys.readouterr().err,
        needle,
        "heatmap",
    )


def test_a_deeply_nested_space_is_one_line(tmp_path, no_model_load, capsys):
    (tmp_path / "s.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    one_line_error(
        main(["search", "--quiet", "--space", str(tmp_path / "s.toml")]),
        capsys.readouterr().err,
        "nests objects or arrays more than 32 levels deep",
    )


def special_files(tmp_path: Path) -> dict[str, Path]:
    """A link to /dev/zero (endless), to /dev/urandom (endless, binary), a FIFO (blocks on read) and a folder."""
    out = {
        "zero": tmp_path / "zero.json",
        "urandom": tmp_path / "urandom.json",
        "fifo": tmp_path / "fifo.json",
        "dir": tmp_path / "d.json",
    }
    out["zero"].symlink_to("/dev/zero")
    out["urandom"].symlink_to("/dev/urandom")
    os.mkfifo(out["fifo"])
    out["dir"].mkdir()
    return out


@pytest.mark.parametrize("kind", ["zero", "urandom", "fifo", "dir"])
def test_plans_spaces_and_proxies_read_only_regular_files(kind, tmp_path, no_model_load, capsys):
    path = special_files(tmp_path)[kind]
    word = {"zero": "a character device", "urandom": "a character device", "fifo": "a FIFO", "dir": "is a folder"}[kind]
    t0 = time.time()
    one_line_error(
        main(["heatmap", str(path), "--out", str(tmp_path / "h.png")]), capsys.readouterr().err, word, "heatmap"
    )
    one_line_error(main(["search", "--quiet", "--space", str(path)]), capsys.readouterr().err, word)
    one_line_error(main(["search", "--quiet", "--proxy", str(path)]), capsys.readouterr().err, word)
    assert time.time() - t0 < 10


def test_an_oversized_plan_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import mpsearch.core.plan

    monkeypatch.setattr(mpsearch.core.plan, "PLAN_BYTES", 1000)
    (tmp_path / "p.json").write_text(" " * 1001)
    with pytest.raises(PlanError, match="is 1,001 bytes; a plan file is at most 1,000"):
        Plan.load(tmp_path / "p.json")


#: backtracks for hours in Python's re on a tensor name; instant with the regex package's time limit
EXPONENTIAL = "re:(.|.)*[0-9]{3}"


def test_a_backtracking_pattern_in_a_plan_is_stopped(model):
    t0 = time.time()
    with pytest.raises(PlanError, match=r"took over 0.25 s .* backtracks without bound"):
        Plan("tiny", fingerprint(model), {EXPONENTIAL: {"weight": Format(4, 32)}}).resolve([Q, Q + "x"])
    with pytest.raises(PlanError, match="match no tensor"):  # the issue's own example: no match, at once
        Plan("tiny", fingerprint(model), {"re:(.|.)*!": {"weight": Format(4, 32)}}).resolve([Q])
    assert time.time() - t0 < 5


@pytest.mark.parametrize("field", ["targets", "ignore", "tie"])
def test_a_backtracking_pattern_in_a_space_is_stopped(field, model):
    pattern = EXPONENTIAL.replace("(.|.)", "((.|.))") if field == "tie" else EXPONENTIAL  # a tie needs a capture group
    space = SearchSpace.from_dict({field: [pattern], **({"targets": ["re:.*layers.*"]} if field != "targets" else {})})
    t0 = time.time()
    with pytest.raises(ValueError, match="backtracks without bound"):
        space.build(model)
    assert time.time() - t0 < 5


# ------------------------------------------------------------------ 6. spaces that allow nothing
@pytest.mark.parametrize(
    "formats,needle",
    [
        ("bits = []", "formats.bits is empty"),
        ("group_sizes = []", "formats.group_sizes is empty"),
    ],
)
def test_an_empty_grid_is_refused_before_the_model_loads(formats, needle, tmp_path, no_model_load, capsys):
    (tmp_path / "s.toml").write_text(f"[formats]\n{formats}\n")
    one_line_error(main(["search", "--quiet", "--space", str(tmp_path / "s.toml")]), capsys.readouterr().err, needle)


def test_a_grid_that_fits_no_tensor_is_refused(model):
    space = SearchSpace.from_dict({"formats": {"bits": [3, 4], "group_sizes": [7]}})
    with pytest.raises(
        SpaceError, match=r"allows nothing: no format of \['u3g7a', 'u4g7a'\] fits 15 of its 15 tensors"
    ):
        space.build(model)


# ------------------------------------------------------------------ 7. proxy files checked when read
@pytest.mark.parametrize(
    "body,needle",
    [
        ('name = "big"\nexpression = "1' + "0" * 1990 + ' * fisher"', "1991-digit number is beyond float64"),
        ('name = "' + "p" * 300 + '"\nexpression = "fisher"', "is not a proxy name"),
        ('name = "../../etc/x"\nexpression = "fisher"', "is not a proxy name"),
    ],
)
def test_proxy_files_are_checked_before_the_model_loads(body, needle, tmp_path, no_model_load, capsys):
    (tmp_path / "p.toml").write_text(body + "\n")
    one_line_error(main(["search", "--quiet", "--proxy", str(tmp_path / "p.toml")]), capsys.readouterr().err, needle)


# ------------------------------------------------------------------ 8. read-only and full caches
def cache_state(cache: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(cache)): (p.stat().st_size, p.stat().st_mtime_ns) for p in cache.rglob("*") if p.is_file()
    }


def test_a_warm_read_only_cache_is_read_and_never_written(tmp_path, tiny_dir):
    cache = tmp_path / "cache"
    warm = run_cli(tiny_search_args(tiny_dir, tmp_path / "a"), cache)
    assert warm.returncode == 0, warm.stderr
    before = cache_state(cache)
    r = run_cli(tiny_search_args(tiny_dir, tmp_path / "b"), cache, read_only=[cache])
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "not writable" in line]
    assert (
        len(said) == 1
        and said[0].startswith(f"cache {cache} is not writable (")
        and "goes on without caching" in said[0]
    ), r.stderr
    assert cache_state(cache) == before
    a, b = (pd.read_csv(tmp_path / d / "results.csv") for d in "ab")
    pd.testing.assert_frame_equal(a, b)


def test_a_cold_read_only_cache_runs_without_caching(tmp_path, tiny_dir):
    cache = tmp_path / "cache"
    cache.mkdir()
    r = run_cli(tiny_search_args(tiny_dir, tmp_path / "a", "--no-measure"), cache, read_only=[cache])
    assert r.returncode == 0 and sum("not writable" in line for line in r.stderr.splitlines()) == 1, r.stderr
    assert os.listdir(cache) == []


@pytest.mark.skipif(not confined.can_fill(), reason="a full disk needs a tmpfs in a mount namespace (root)")
def test_a_full_cache_leaves_no_partial_folder_and_the_run_goes_on(tmp_path):
    """A converted model that does not fit: one line naming the cache, its partial folder removed, the model used
    anyway."""
    cache = tmp_path / "cache"
    cache.mkdir()
    gguf_path = tiny_gguf(tmp_path / "tiny.gguf")
    code = (
        "from mpsearch.models import load_model; import logging; logging.basicConfig(level=logging.WARNING, "
        "format='%(message)s'); "
        f"lm = load_model({str(gguf_path)!r}); print('loaded', lm.model.config.hidden_size)"
    )
    script = f"{sys.executable} -c {json.dumps(code)}; rc=$?; echo listing; ls -A {cache}/models; exit $rc"
    r = confined.run(["sh", "-c", script], full=cache, full_kb=96, env={**os.environ, "MPSEARCH_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert "loaded 256" in r.stdout and ".partial" not in r.stdout.split("listing")[1], r.stdout
    lines = [line for line in r.stderr.splitlines() if str(cache) in line]
    assert lines == [
        f"cache {cache} is full (No space left on device): this run reads what it holds and goes on without caching"
    ], r.stderr


# ------------------------------------------------------------------ 9. same inputs and seed, same figures and files
def test_measuring_the_machine_leaves_the_random_state_alone():
    """The peak measurement on a fresh cache drew from torch's global generator: a run that measured
    it and one that read it from the cache went on with other random states."""
    from mpsearch.run.profile import measure_peaks

    torch.manual_seed(5)
    want = torch.rand(4)
    torch.manual_seed(5)
    measure_peaks()
    assert torch.equal(torch.rand(4), want)


def test_fresh_and_warm_runs_write_the_same_plan_files(tmp_path, tiny_dir):
    """Two runs on fresh caches and a rerun on a warm one: the same figures, byte-identical plans.
    The local roofline (this machine's measured peaks) is in results.csv only."""

    def args(out):
        return [a if a != "t4" else "local" for a in tiny_search_args(tiny_dir, out, "--seed", "1")]

    for out, cache in (("a", "c1"), ("b", "c2"), ("c", "c1")):
        r = run_cli(args(tmp_path / out), tmp_path / cache)
        assert r.returncode == 0, r.stderr
    plans = sorted(p.name for p in (tmp_path / "a" / "plans").glob("*.json"))
    assert plans
    for name in plans:
        a = (tmp_path / "a" / "plans" / name).read_bytes()
        assert a == (tmp_path / "b" / "plans" / name).read_bytes() == (tmp_path / "c" / "plans" / name).read_bytes(), (
            name
        )
        assert b"cost_latency" not in a
    tables = [pd.read_csv(tmp_path / d / "results.csv") for d in "abc"]
    timed = [c for c in tables[0] if c.startswith("cost_latency")]
    assert timed and all(tables[0][c].notna().all() for c in timed)  # measured, kept beside the plans
    for t in tables[1:]:
        pd.testing.assert_frame_equal(t.drop(columns=timed), tables[0].drop(columns=timed))
