"""Hostile but realistic input, through the real command line on the default model (issue 32).

Each case runs ``mpsearch`` in a fresh working folder and checks what a careful user expects:

- bad input ends with exit 2 and one line on stderr (``mpsearch CMD: error: ...``) naming the
  problem, no traceback, within the case's time limit (a hang is a failed case);
- nothing is written outside the case's ``out`` paths: not in the working folder, not in ``/``,
  and, for a refused case, not in the cache;
- cases that must succeed (a read-only cache, a full one, ``--nearest``) exit 0 and say what
  they did in one line where the issue asks for one.

The cases follow the issue's ten items; items 9 and 10 (same inputs, same figures and files;
two searches on one fresh cache) run smaller searches twice. Read-only folders and full disks
are real (a read-only bind mount and a small tmpfs in a mount namespace: root; see tests/confined.py).

Writes ``benchmarks/results/hostile.csv`` (``item, case, held, rc, seconds, why, stderr``) and
``hostile.json`` (machine, counts per item).

    .venv/bin/python benchmarks/hostile.py                 # about 40 minutes on 2 cores
    .venv/bin/python benchmarks/hostile.py --items 1 2 5   # some items only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.foundation import machine  # noqa: E402
from tests import confined  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
CLI = [sys.executable, "-m", "mpsearch.cli"]
Q = "model.layers.0.self_attn.q_proj"
#: a small search on the default model (a minute or two), for the cases that run one
SMALL = [
    "--calib-chunks",
    "2",
    "--gram-chunks",
    "2",
    "--calib-seq-len",
    "256",
    "--eval-chunks",
    "2",
    "--eval-seq-len",
    "256",
    "--refine",
    "0",
    "--no-tasks",
    "--quiet",
]


@dataclass
class Case:
    item: int
    name: str
    argv: list[str]
    rc: tuple[int, ...] = (2,)
    needle: str = ""
    prepare: Callable[[Path], None] | None = None
    #: warm (the shared cache), fresh (an empty one), or a callable making one from the warm cache
    cache: str = "warm"
    seconds: float = 90
    read_only: tuple[str, ...] = ()
    full: bool = False
    check: Callable[[Path, subprocess.CompletedProcess], str | None] | None = None
    out: tuple[str, ...] = ("out",)
    env: dict = field(default_factory=dict)


# ------------------------------------------------------------------ inputs
def default_plan(w: Path, fmt: dict | None = None, key: str = Q) -> dict:
    from mpsearch.core.plan import fingerprint
    from mpsearch.models import load_model

    global _FP
    if _FP is None:
        _FP = fingerprint(load_model("smollm2").model)
    return {
        "format": "mpsearch.core.plan/v1",
        "model": {"id": "smollm2", "fingerprint": _FP},
        "tensors": {key: {"weight": fmt or {"bits": 4, "group_size": 64}}},
    }


_FP = None


def write_plan(name: str = "plan.json", **kw) -> Callable[[Path], None]:
    return lambda w: (w / name).write_text(json.dumps(default_plan(w, **kw)))


def write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def go(w: Path) -> None:
        (w / name).write_bytes(text if isinstance(text, bytes) else text.encode())

    return go


def link(name: str, target: str) -> Callable[[Path], None]:
    return lambda w: (w / name).symlink_to(target)


def fifo(name: str) -> Callable[[Path], None]:
    return lambda w: os.mkfifo(w / name)


def both(*fns) -> Callable[[Path], None]:
    def go(w: Path) -> None:
        for f in fns:
            f(w)

    return go


def folder(name: str, files: dict[str, str] | None = None) -> Callable[[Path], None]:
    def go(w: Path) -> None:
        (w / name).mkdir()
        for k, v in (files or {}).items():
            (w / name / k).write_text(v)

    return go


def nan_model(w: Path) -> None:
    """A small Llama (the default model's tokenizer) whose final norm is infinite: every output is NaN."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mpsearch.core.plan import fingerprint
    from mpsearch.models import load_model

    tok = load_model("smollm2").tokenizer
    torch.manual_seed(0)
    m = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with torch.no_grad():
        m.model.norm.weight.fill_(float("inf"))
    m.save_pretrained(w / "nan")
    tok.save_pretrained(w / "nan")
    (w / "plan.json").write_text(
        json.dumps(
            {
                "format": "mpsearch.core.plan/v1",
                "model": {"id": "nan", "fingerprint": fingerprint(m)},
                "tensors": {Q: {"weight": {"bits": 4, "group_size": 64}}},
            }
        )
    )


SPACE = 'targets = ["re:.*layers.*"]\n[formats]\nbits = [3, 4]\ngroup_sizes = [64]\n'
EXPONENTIAL = "(.|.)*[0-9]{3}"


# ------------------------------------------------------------------ checks
def unchanged(rel: str) -> Callable:
    """The folder ``rel`` (in the work folder) holds what it held before."""

    def check(w: Path, r) -> str | None:
        want = json.loads((w / f".{rel}.listing").read_text())
        have = sorted(str(p.relative_to(w / rel)) for p in (w / rel).rglob("*"))
        return None if have == want else f"{rel} changed: {sorted(set(have) ^ set(want))[:3]}"

    return check


def said(*needles: str, lines: int | None = None) -> Callable:
    def check(w: Path, r) -> str | None:
        hits = [ln for ln in r.stderr.splitlines() if all(n in ln for n in needles)]
        if not hits:
            return f"stderr says nothing of {needles}"
        if lines is not None and len(hits) != lines:
            return f"{len(hits)} lines say {needles}, expected {lines}"
        return None

    return check


def all_of(*checks) -> Callable:
    def check(w, r):
        return next((why for c in checks if (why := c(w, r))), None)

    return check


# ------------------------------------------------------------------ the cases
def cases() -> list[Case]:
    out: list[Case] = []
    add = out.append
    search = ["search", "--quiet"]
    # 1. output paths
    for cmd in ("search", "evolve"):
        add(Case(1, f"{cmd} --out /", [cmd, "--quiet", "--out", "/"], needle="filesystem root", seconds=20))
        add(
            Case(
                1,
                f"{cmd} --out an existing file",
                [cmd, "--quiet", "--out", "{w}/f"],
                needle="is a file",
                prepare=write("f", "x"),
                seconds=20,
            )
        )
        add(
            Case(
                1,
                f"{cmd} --out a folder of other files",
                [cmd, "--quiet", "--out", "{w}/theirs"],
                needle="not one mpsearch wrote",
                prepare=folder("theirs", {"a.txt": "mine"}),
                seconds=20,
            )
        )
        add(
            Case(
                1,
                f"{cmd} --out inside a read-only folder",
                [cmd, "--quiet", "--out", "{w}/ro/run"],
                needle="cannot write in",
                prepare=folder("ro"),
                read_only=("ro",),
                seconds=20,
            )
        )
        add(
            Case(
                1,
                f"{cmd} --out below a file",
                [cmd, "--quiet", "--out", "{w}/f/run"],
                needle="is a file, not a folder",
                prepare=write("f", "x"),
                seconds=20,
            )
        )
    add(
        Case(
            1,
            "apply --out an existing file",
            ["apply", "{w}/plan.json", "--out", "{w}/f"],
            needle="is a file",
            prepare=both(write_plan(), write("f", "x")),
            seconds=20,
        )
    )
    add(
        Case(
            1,
            "apply --out a read-only folder",
            ["apply", "{w}/plan.json", "--out", "{w}/ro"],
            needle="cannot write in",
            prepare=both(write_plan(), folder("ro")),
            read_only=("ro",),
            seconds=20,
        )
    )
    add(
        Case(
            1,
            "apply --out someone's model folder",
            ["apply", "{w}/plan.json", "--out", "{w}/theirs"],
            needle="not one mpsearch wrote",
            prepare=both(write_plan(), folder("theirs", {"config.json": "{}", "model.safetensors": "x"})),
            seconds=20,
        )
    )
    for to in ("gguf", "compressed-tensors", "llama.cpp-tensor-types"):
        add(
            Case(
                1,
                f"export --to {to} --out a folder",
                ["export", "{w}/plan.json", "--to", to, "--out", "{w}/d"],
                needle="is a folder",
                prepare=both(write_plan(), folder("d")),
                seconds=20,
            )
        )
    add(
        Case(
            1,
            "export --out /dev/null",
            ["export", "{w}/plan.json", "--to", "gguf", "--out", "/dev/null"],
            needle="not a file to write",
            prepare=write_plan(),
            seconds=20,
        )
    )
    add(
        Case(
            1,
            "heatmap --out a folder",
            ["heatmap", "{w}/plan.json", "--out", "{w}/d"],
            needle="is a folder",
            prepare=both(write_plan(), folder("d")),
            seconds=20,
        )
    )
    add(
        Case(
            1,
            "leaderboard --out under a file",
            ["leaderboard", "gt.csv", "--out", "{w}/f/board"],
            needle="is a file",
            prepare=write("f", "x"),
            seconds=20,
        )
    )
    add(
        Case(
            1,
            "evolve-proxy --checkpoint a folder",
            ["evolve-proxy", "gt.csv", "--out", "{w}/p.toml", "--checkpoint", "{w}/d"],
            needle="is a folder",
            prepare=folder("d"),
            seconds=20,
        )
    )
    add(
        Case(
            1,
            "profile-device --out a file",
            ["profile-device", "--out", "{w}/f"],
            needle="is a file",
            prepare=write("f", "x"),
            seconds=20,
        )
    )
    add(
        Case(
            1,
            "worker --out a file",
            ["worker", "--storage", "{w}/s.log", "--out", "{w}/f"],
            needle="is a file",
            prepare=write("f", "x"),
            seconds=20,
        )
    )
    add(
        Case(
            1,
            "search reruns into its own folder",
            [*search, *SMALL, "--no-measure", "--proxy", "mse", "--out", "{w}/out"],
            rc=(0,),
            prepare=lambda w: subprocess.run(
                [*CLI, *search, *SMALL, "--no-measure", "--proxy", "mse", "--out", str(w / "out")],
                capture_output=True,
                check=True,
            ),
            seconds=300,
        )
    )
    # 2. exports never drop information silently
    outl = {"bits": 4, "group_size": 64, "params": {"outliers": 0.01}}
    for to in ("compressed-tensors", "gptqmodel", "autoround", "torchao"):
        add(
            Case(
                2,
                f"export --to {to} of a format with outliers",
                ["export", "{w}/plan.json", "--to", to, "--out", "{w}/out/x.json"],
                needle=Q,
                prepare=write_plan(fmt=outl),
            )
        )
    for to in ("compressed-tensors", "gptqmodel", "autoround"):
        add(
            Case(
                2,
                f"export --to {to} --nearest of a format with outliers",
                ["export", "{w}/plan.json", "--to", to, "--nearest", "--out", "{w}/out/x.json"],
                rc=(0,),
                prepare=write_plan(fmt=outl),
                check=said("--nearest:", Q, "u4g64a+o1 -> w4g64a", lines=1),
            )
        )
    add(
        Case(
            2,
            "export --to gguf of an integer format",
            ["export", "{w}/plan.json", "--to", "gguf", "--out", "{w}/out/x.gguf"],
            needle="has no GGML type",
            prepare=write_plan(),
        )
    )
    # 3. every file of a cached model
    for name, edit in (
        ("config.json rms_norm_eps 1e-5 -> 1e-2", "config"),
        ("tokenizer.json edited", "tokenizer"),
        ("a file added", "extra"),
    ):
        add(
            Case(
                3,
                f"cached model: {name}",
                ["heatmap", "{w}/plan.json", "--model", "smollm2", "--out", "{w}/out/h.png"],
                rc=(0,),
                prepare=write_plan(),
                cache=f"edit:{edit}",
                check=said("is unusable", "since it was cached", lines=1),
                seconds=180,
            )
        )
    # 4. quantizer parameters, unquantized formats, NaN
    for label, fmt, needle in (
        ("gptq damp 1e308", {"bits": 4, "quantizer": "gptq", "params": {"damp": 1e308}}, "damp"),
        ("gptq damp NaN", {"bits": 4, "quantizer": "gptq", "params": {"damp": float("nan")}}, "damp"),
        ("gptq damp 0", {"bits": 4, "quantizer": "gptq", "params": {"damp": 0}}, "damp"),
        ("gptq block 0", {"bits": 4, "quantizer": "gptq", "params": {"block": 0}}, "block"),
        ("gptq block 'x'", {"bits": 4, "quantizer": "gptq", "params": {"block": "x"}}, "block"),
        ("quantizer none at 3 bits", {"quantizer": "none", "bits": 3}, "fixed layout (bits=16)"),
        ("outliers 0.5", {"bits": 4, "params": {"outliers": 0.5}}, "outliers must be a fraction"),
        ("kvquant sinks -1 on a weight", {"bits": 4, "quantizer": "kvquant", "params": {"sinks": -1}}, "sinks"),
    ):
        add(
            Case(
                4,
                f"eval: {label}",
                ["eval", "{w}/plan.json", "--quiet"],
                needle=needle,
                prepare=write_plan(fmt=fmt),
                seconds=20,
            )
        )
    add(
        Case(
            4,
            "eval of a model whose outputs are NaN",
            ["eval", "{w}/plan.json", "--quiet", "--model", "{w}/nan", "--eval-chunks", "1", "--eval-seq-len", "64"],
            rc=(1,),
            needle="measured NaN or infinite quality",
            prepare=nan_model,
            seconds=60,
        )
    )
    # 5. unbounded and recursive input
    deep = "[" * 200_000 + "]" * 200_000
    for cmd, extra in (
        ("heatmap", ["--out", "{w}/out/h.png"]),
        ("eval", ["--quiet"]),
        ("apply", ["--out", "{w}/out/m"]),
        ("export", ["--to", "gguf", "--out", "{w}/out/x.gguf"]),
    ):
        add(
            Case(
                5,
                f"{cmd}: a plan of 200,000 nested brackets",
                [cmd, "{w}/p.json", *extra],
                needle="levels deep",
                prepare=write("p.json", deep),
                seconds=20,
            )
        )
    add(
        Case(
            5,
            "search: a space of 100,000 nested arrays",
            [*search, "--space", "{w}/s.toml"],
            needle="levels deep",
            prepare=write("s.toml", "a = " + "[" * 100_000 + "]" * 100_000 + "\n"),
            seconds=20,
        )
    )
    add(
        Case(
            5,
            "search: a space of 40 nested inline tables",
            [*search, "--space", "{w}/s.toml"],
            needle="levels deep",
            prepare=write("s.toml", "a = " + "{b = " * 40 + "1" + "}" * 40 + "\n"),
            seconds=20,
        )
    )
    for what, make, word in (
        ("/dev/zero", link("x", "/dev/zero"), "character device"),
        ("/dev/urandom", link("x", "/dev/urandom"), "character device"),
        ("a FIFO", fifo("x"), "FIFO"),
        ("a folder", folder("x"), "folder"),
    ):
        add(
            Case(
                5,
                f"plan is {what}",
                ["heatmap", "{w}/x", "--out", "{w}/out/h.png"],
                needle=word,
                prepare=make,
                seconds=20,
            )
        )
        add(Case(5, f"space is {what}", [*search, "--space", "{w}/x"], needle=word, prepare=make, seconds=20))
        add(Case(5, f"proxy is {what}", [*search, "--proxy", "{w}/x"], needle=word, prepare=make, seconds=20))
    add(
        Case(
            5,
            "plan of 100 MB",
            ["heatmap", "{w}/p.json", "--out", "{w}/out/h.png"],
            needle="at most",
            prepare=lambda w: (w / "p.json").write_bytes(b" " * (100 << 20)),
            seconds=20,
        )
    )
    add(
        Case(
            5,
            f"plan key re:{EXPONENTIAL}",
            ["eval", "{w}/plan.json", "--quiet"],
            needle="backtracks without bound",
            prepare=write_plan(key=f"re:{EXPONENTIAL}"),
            seconds=60,
        )
    )
    add(
        Case(
            5,
            "plan key re:(.|.)*! (the probe's)",
            ["eval", "{w}/plan.json", "--quiet"],
            needle="match no decision tensor",
            prepare=write_plan(key="re:(.|.)*!"),
            seconds=60,
        )
    )
    for field_, text in (
        ("targets", f'targets = ["re:{EXPONENTIAL}"]'),
        ("ignore", f'targets = ["re:.*"]\nignore = ["re:{EXPONENTIAL}"]'),
        ("tie", f'targets = ["re:.*layers.*"]\ntie = ["re:({EXPONENTIAL})"]'),
    ):
        add(
            Case(
                5,
                f"space {field_} re:{EXPONENTIAL}",
                [*search, *SMALL, "--space", "{w}/s.toml", "--out", "{w}/out"],
                needle="backtracks without bound",
                prepare=write("s.toml", SPACE.replace('targets = ["re:.*layers.*"]', text).replace("\\", "\\\\")),
                seconds=120,
            )
        )
    add(
        Case(
            5,
            f"--min-bits re:{EXPONENTIAL}=4",
            [*search, *SMALL, "--min-bits", f"re:{EXPONENTIAL}=4", "--out", "{w}/out"],
            needle="backtracks without bound",
            seconds=120,
        )
    )
    add(
        Case(
            5,
            "plan key of 5,000 characters",
            ["heatmap", "{w}/plan.json", "--out", "{w}/out/h.png"],
            needle="characters",
            prepare=write_plan(key="x" * 5000),
            seconds=20,
        )
    )
    # 6. spaces that allow nothing
    for label, text, needle in (
        ("bits = []", "[formats]\nbits = []\n", "formats.bits is empty"),
        ("group_sizes = []", "[formats]\ngroup_sizes = []\n", "formats.group_sizes is empty"),
        ("list = []", "[formats]\nlist = []\n", "non-empty list"),
        ("group_sizes = [7]", 'targets = ["re:.*layers.*"]\n[formats]\ngroup_sizes = [7]\n', "allows nothing"),
    ):
        add(
            Case(
                6,
                f"space {label}, budget uniform:3",
                [*search, *SMALL, "--space", "{w}/s.toml", "--out", "{w}/out"],
                needle=needle,
                prepare=write("s.toml", text),
                seconds=120,
            )
        )
    # 7. proxy files
    for label, text, needle in (
        ("a 1,990-digit integer", f'name = "p"\nexpression = "1{"0" * 1989} * fisher"\n', "beyond float64"),
        ("1e999", 'name = "p"\nexpression = "1e999 * fisher"\n', "beyond float64"),
        ("a 300-character name", f'name = "{"p" * 300}"\nexpression = "fisher"\n', "not a proxy name"),
        ("a name with a slash", 'name = "a/b"\nexpression = "fisher"\n', "not a proxy name"),
        ("100 nested parentheses", f'name = "p"\nexpression = "{"(" * 100}fisher{")" * 100}"\n', "nesting depth"),
        ("a 3,000-character expression", f'name = "p"\nexpression = "{" + ".join(["fisher"] * 400)}"\n', "too long"),
    ):
        add(
            Case(
                7,
                f"proxy with {label}",
                [*search, "--proxy", "{w}/p.toml"],
                needle=needle,
                prepare=write("p.toml", text),
                seconds=20,
            )
        )
    # 8. read-only and full caches
    run = [*search, *SMALL, "--proxy", "mse", "--hardware", "t4", "--no-profile"]
    add(
        Case(
            8,
            "search on a warm read-only cache",
            [*run, "--out", "{w}/out/b"],
            rc=(0,),
            cache="ro-warm",
            seconds=600,
            check=all_of(said("is not writable", lines=1), unchanged("cache")),
        )
    )
    add(
        Case(
            8,
            "search on an empty read-only cache",
            [*run, "--out", "{w}/out/b"],
            rc=(0,),
            cache="ro-cold",
            seconds=600,
            check=all_of(said("is not writable", lines=1), unchanged("cache")),
        )
    )
    add(
        Case(
            8,
            "search on a full cache (1 MB)",
            [*run, "--out", "{w}/out/b"],
            rc=(0,),
            cache="full",
            seconds=600,
            check=said("is full", lines=1),
        )
    )
    # 9 and 10 are compared across runs: see determinism()
    return out


# ------------------------------------------------------------------ running them
def prepare_cache(kind: str, w: Path, warm: Path) -> Path:
    """The cache a case runs on (made from the warm one where it needs a converted model)."""
    if kind == "warm":
        return warm
    cache = w / "cache"
    cache.mkdir()
    if kind in ("ro-cold", "full"):
        return cache
    for sub in ("models", "data"):
        shutil.copytree(warm / sub, cache / sub, symlinks=True)
    if kind.startswith("edit:"):
        (d,) = [p for p in (cache / "models").iterdir() if p.name.startswith("SmolLM2")]
        edit = kind[5:]
        if edit == "config":
            cfg = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-2}, indent=1))
        elif edit == "tokenizer":
            t = d / "tokenizer" / "tokenizer.json"
            t.write_text(t.read_text().replace('"<|endoftext|>"', '"<|endoftext!|>"', 1))
        else:
            (d / "tokenizer" / "extra.json").write_text("{}")
    if kind == "ro-warm":  # the same search, once, to warm it
        r = subprocess.run(
            [
                *CLI,
                "search",
                "--quiet",
                *SMALL,
                "--proxy",
                "mse",
                "--hardware",
                "t4",
                "--no-profile",
                "--out",
                str(w / "out" / "a"),
            ],
            env={**os.environ, "MPSEARCH_CACHE": str(cache)},
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
    return cache


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def run_case(c: Case, base: Path, warm: Path) -> dict:
    w = base / f"case{run_case.n:03d}"
    run_case.n += 1
    w.mkdir()
    if c.prepare:
        c.prepare(w)
    cache = prepare_cache(c.cache, w, warm)
    (w / ".cache.listing").write_text(json.dumps(listing(cache))) if cache.is_relative_to(w) else None
    before = {
        p for p in listing(w) if not p.startswith(c.out) and not p.startswith("cache") and not p.startswith(".cache")
    }
    warm_before = listing(warm) if c.rc == (2,) else None
    slash = set(os.listdir("/"))
    argv = [a.replace("{w}", str(w)) for a in c.argv]
    env = {**os.environ, "MPSEARCH_CACHE": str(cache), **c.env}
    t0 = time.time()
    try:
        kw = {
            "read_only": [w / p for p in c.read_only] + ([cache] if c.cache.startswith("ro-") else []),
            "full": cache if c.cache == "full" else None,
            "full_kb": 1024,
        }
        if kw["read_only"] or kw["full"]:
            r = confined.run([*CLI, *argv], env=env, cwd=w, timeout=c.seconds, **kw)
        else:
            r = subprocess.run([*CLI, *argv], env=env, cwd=w, capture_output=True, text=True, timeout=c.seconds)
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired:
        return {
            "item": c.item,
            "case": c.name,
            "held": False,
            "rc": None,
            "seconds": round(time.time() - t0, 1),
            "why": f"hung (over {c.seconds:g} s)",
            "stderr": "",
        }
    seconds = time.time() - t0
    lines = [ln for ln in err.splitlines() if ln.startswith("mpsearch ")]
    why = None
    if rc not in c.rc:
        why = f"exit {rc}, expected {c.rc}"
    elif "Traceback" in err:
        why = "a traceback"
    elif c.rc != (0,) and (len(lines) != 1 or c.needle not in lines[0]):
        why = f"expected one line saying {c.needle!r}"
    elif (
        after := {
            p
            for p in listing(w)
            if not p.startswith(c.out) and not p.startswith("cache") and not p.startswith(".cache")
        }
    ) != before:
        why = f"wrote outside --out: {sorted(after - before)[:3]}"
    elif set(os.listdir("/")) != slash:
        why = "wrote into /"
    elif warm_before is not None and listing(warm) != warm_before:
        why = "a refused case wrote into the cache"
    elif c.check is not None:
        why = c.check(w, r)
    shown = lines[0] if lines else " | ".join(err.strip().splitlines()[-2:])
    return {
        "item": c.item,
        "case": c.name,
        "held": why is None,
        "rc": rc,
        "seconds": round(seconds, 1),
        "why": why or "",
        "stderr": shown[:300],
    }


run_case.n = 0


def determinism(base: Path, warm: Path) -> list[dict]:
    """Item 9: the issue's search twice on fresh caches (the model converted each time) and once more on the
    first, warm; item 10: two searches with other settings at once on one fresh cache, and the second alone."""

    def fresh(name: str) -> Path:
        c = base / name
        c.mkdir()
        shutil.copytree(warm / "data", c / "data", symlinks=True)
        return c

    def search(cache: Path, out: str, *extra: str) -> float:
        t0 = time.time()
        r = subprocess.run(
            [
                *CLI,
                "search",
                *SMALL,
                "--proxy",
                "mse",
                "--budget",
                "4.0",
                "--seed",
                "1",
                *extra,
                "--out",
                str(base / out),
            ],
            env={**os.environ, "MPSEARCH_CACHE": str(cache)},
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        return time.time() - t0

    rows = []
    t = sum(search(c, o) for c, o in ((fresh("d1"), "det1"), (fresh("d2"), "det2"), (base / "d1", "det3")))
    res = [pd.read_csv(base / d / "results.csv") for d in ("det1", "det2", "det3")]
    timed = [c for c in res[0] if c.startswith(("cost_latency", "cost_measured"))]
    same_figures = all(r.drop(columns=timed).equals(res[0].drop(columns=timed)) for r in res[1:])
    names = sorted(p.name for p in (base / "det1" / "plans").glob("*.json"))
    same_files = all(
        (base / "det1" / "plans" / n).read_bytes() == (base / d / "plans" / n).read_bytes()
        for n in names
        for d in ("det2", "det3")
    )
    ref = [float(r.loc[r.kind == "reference", "ppl"].iloc[0]) for r in res]
    rows.append(
        {
            "item": 9,
            "case": "search --proxy mse --budget 4.0 --seed 1: two fresh caches and a warm rerun give the same figures",
            "held": same_figures,
            "rc": 0,
            "seconds": round(t, 1),
            "why": "" if same_figures else "figures differ",
            "stderr": f"reference ppl {ref}",
        }
    )
    rows.append(
        {
            "item": 9,
            "case": "... and byte-identical plan files",
            "held": same_files and bool(names),
            "rc": 0,
            "seconds": 0.0,
            "why": "" if same_files else "plan files differ",
            "stderr": f"{len(names)} plans",
        }
    )
    shared = fresh("shared")
    t0 = time.time()
    first = subprocess.Popen(
        [*CLI, "search", *SMALL, "--proxy", "fisher", "--budget", "4.0", "--out", str(base / "pA")],
        env={**os.environ, "MPSEARCH_CACHE": str(shared)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(15)
    search(shared, "pB", "--proxy", "fisher", "--budget", "3.5")
    first.wait()
    search(fresh("alone"), "pB2", "--proxy", "fisher", "--budget", "3.5")
    a, b = (pd.read_csv(base / d / "results.csv") for d in ("pB", "pB2"))
    same = a["predicted_fisher"].equals(b["predicted_fisher"]) and a.drop(columns=timed, errors="ignore").equals(
        b.drop(columns=timed, errors="ignore")
    )
    rows.append(
        {
            "item": 10,
            "case": "two searches at once on one fresh cache: the second's figures equal its run alone",
            "held": same,
            "rc": 0,
            "seconds": round(time.time() - t0, 1),
            "why": "" if same else "predicted_fisher or figures differ",
            "stderr": f"predicted_fisher {a['predicted_fisher'].dropna().tolist()} vs "
            f"{b['predicted_fisher'].dropna().tolist()}",
        }
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="*", default=None, help="run only these items (1-10)")
    ap.add_argument("--out", default=str(OUT / "hostile"), help="results prefix (default benchmarks/results/hostile)")
    a = ap.parse_args()
    from mpsearch.models import load_model
    from mpsearch.store.cache import cache_dir

    load_model("smollm2")  # the warm cache holds the converted default model and its data
    warm = cache_dir()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpsearch-hostile-") as tmp:
        base = Path(tmp)
        for c in cases():
            if a.items is None or c.item in a.items:
                rows.append(run_case(c, base, warm))
                r = rows[-1]
                print(
                    f"[{r['item']}] {'held' if r['held'] else 'FAILED'} {r['case']} ({r['seconds']} "
                    f"s){': ' + r['why'] if r['why'] else ''}",
                    flush=True,
                )
        if a.items is None or {9, 10} & set(a.items):
            for r in determinism(base, warm):
                rows.append(r)
                print(f"[{r['item']}] {'held' if r['held'] else 'FAILED'} {r['case']}: {r['stderr']}", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(f"{a.out}.csv", index=False)
    per_item = {int(i): {"tried": len(g), "held": int(g.held.sum())} for i, g in df.groupby("item")}
    Path(f"{a.out}.json").write_text(
        json.dumps(
            {
                "machine": machine(2),
                "tried": len(df),
                "held": int(df.held.sum()),
                "failed": int((~df.held).sum()),
                "per_item": per_item,
            },
            indent=1,
        )
    )
    print(f"{len(df)} cases: {int(df.held.sum())} held, {int((~df.held).sum())} failed; wrote {a.out}.csv and .json")


if __name__ == "__main__":
    main()
