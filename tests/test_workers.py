"""Many workers on one study, and searches that survive SIGKILL (issue 17).

Every process here is real: workers and searches run as their own programs
(``tests/procs``) and are killed with ``kill -9``. Storages: a journal file, and a real
PostgreSQL server started by the test setup (``tests/postgres.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from mpsearch.run.evolution import EvolutionConfig, evolve, trials_table
from tests.procs.toy_worker import toy_quality, toy_space

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["journal", "postgresql"])
def storage_url(request, tmp_path) -> str:
    """A fresh study storage: a journal file, or a new database on the test PostgreSQL server."""
    if request.param == "journal":
        return str(tmp_path / "study.log")
    import sqlalchemy as sa

    server = request.getfixturevalue("postgres_url")
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return server.rsplit("/", 1)[0] + "/" + name


def toy_study(url: str, trials: int, decisions: int = 6, seeds=()) -> None:
    evolve(
        toy_space(decisions),
        None,
        url,
        EvolutionConfig(trials=trials, population=4, study_name="toy"),
        seeds,
        progress=False,
        work=False,
    )


def start_worker(url: str, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.procs.toy_worker", url, str(log), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(p: subprocess.Popen, timeout: float = 180) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out
    return out


def wait_for(cond, timeout: float = 120, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def log_lines(log: Path) -> list[tuple[int, str, str]]:
    if not log.exists():
        return []
    return [
        (int(p), what, key) for p, what, key in (line.split() for line in log.read_text().splitlines() if line.strip())
    ]


def study_table(url: str) -> pd.DataFrame:
    import optuna

    from mpsearch.store.storage import open_storage

    return trials_table(optuna.load_study(study_name="toy", storage=open_storage(url, 1)))


def test_kill_9_a_worker_mid_trial_its_trial_is_failed_by_the_heartbeat_and_retried(storage_url, tmp_path):
    log = tmp_path / "measured.log"
    toy_study(storage_url, trials=12, seeds=[(0,) * 6, (3,) * 6])
    a = start_worker(storage_url, log, "--stall-at", "4", "--sleep", "0.05")
    wait_for(
        lambda: sum(1 for p, w, _ in log_lines(log) if p == a.pid and w == "start") == 4 or a.poll() is not None,
        what="the 4th measurement",
    )
    assert a.poll() is None, a.stdout.read()
    stalled = [k for p, w, k in log_lines(log) if p == a.pid and w == "start"][-1]
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    if "://" in storage_url:
        time.sleep(4)  # the heartbeat's grace period (3 x 1 s) runs out; a journal sees the process is gone at once
    finish(start_worker(storage_url, log, "--sleep", "0.05"))

    df = study_table(storage_url)
    complete, failed = df[df.state == "COMPLETE"], df[df.state == "FAIL"]
    assert len(complete) == 12 and len(failed) == 1 and len(df) == len(complete) + len(failed)  # counts add up
    assert failed.plan_hash.item() == stalled
    retry = df[df.retry_of == failed.trial.item()]
    assert retry.state.tolist() == ["COMPLETE"] and retry.plan_hash.item() == stalled and retry.measured.item()
    done = [k for _, w, k in log_lines(log) if w == "done"]
    assert len(done) == len(set(done))  # no plan measured twice
    kept = set(complete[complete.measured & ~complete.duplicate.astype(bool)].plan_hash)
    assert {
        k for p, w, k in log_lines(log) if p == a.pid and w == "done"
    } <= kept  # the killed worker's finished trials are kept
    assert kept == set(done)


def test_two_workers_drawing_the_same_plans_at_once_measure_each_plan_once(storage_url, tmp_path):
    log = tmp_path / "measured.log"
    toy_study(storage_url, trials=20, decisions=2)  # 16 plans in all: repeats are certain
    workers = [
        start_worker(storage_url, log, "--decisions", "2", "--seed", "7", "--sleep", "0.2") for _ in range(2)
    ]  # same draws
    for w in workers:
        finish(w)
    df = study_table(storage_url)
    done = [k for _, w, k in log_lines(log) if w == "done"]
    assert len(done) == len(set(done))  # which worker measures is a race; that no plan is measured twice is not
    measured = df[(df.state == "COMPLETE") & df.measured]
    assert (
        set(measured.plan_hash) == set(done) and measured.duplicate.astype(bool).sum() == len(measured) - len(done) > 0
    )
    space = toy_space(2)
    for _, row in measured.iterrows():  # a duplicate carries its owner's measurement
        assert row.kl == pytest.approx(toy_quality([row.params[d] for d in space.decisions])["kl"])
    assert (df.state == "COMPLETE").sum() >= 20


def test_a_worker_given_a_missing_journal_fails_naming_it_and_creates_nothing(tmp_path):
    from mpsearch.cli import main

    path = tmp_path / "nothing" / "study.log"
    assert main(["worker", "--storage", str(path)]) == 2
    assert not path.parent.exists()


def test_a_worker_on_a_study_evolve_did_not_make_is_refused(tmp_path):
    from mpsearch.run.worker import run_worker

    toy_study(str(tmp_path / "s.log"), trials=2)
    with pytest.raises(ValueError, match="no study 'mpsearch'.*holds: toy"):
        run_worker(tmp_path / "s.log", "mpsearch")


# ---------------------------------------------------------------- mpsearch worker on the real model
@pytest.mark.real
def test_mpsearch_workers_share_one_postgresql_study(postgres_url, tmp_path):
    """evolve creates the study in PostgreSQL and measures nothing; two `mpsearch worker` processes share the trials."""
    small = [
        "--budget",
        "uniform:3",
        "--population",
        "4",
        "--calib-chunks",
        "2",
        "--calib-seq-len",
        "128",
        "--eval-chunks",
        "1",
        "--eval-seq-len",
        "64",
        "--quiet",
        "--threads",
        "1",
        "--heartbeat",
        "2",
    ]
    out = tmp_path / "evo"
    cmd = [sys.executable, "-m", "mpsearch.cli"]
    subprocess.run(
        cmd
        + [
            "evolve",
            *small,
            "--trials",
            "8",
            "--storage",
            postgres_url,
            "--study-name",
            "shared",
            "--no-work",
            "--out",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    workers = [
        subprocess.Popen(
            cmd + ["worker", "--study", "shared", "--storage", postgres_url, "--threads", "1", "--quiet"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    for w in workers:
        finish(w, timeout=600)
    res = subprocess.run(
        cmd
        + ["evolve", *small, "--trials", "8", "--storage", postgres_url, "--study-name", "shared", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    trials = pd.read_csv(out / "trials.csv")
    assert (trials.state == "COMPLETE").sum() >= 8 and (trials.source == "seed").sum() >= 2
    measured = trials[trials.measured & ~trials.duplicate.astype(bool)]
    assert measured.plan_hash.is_unique
    assert list((out / "plans").glob("nsga2-*.json"))


# ---------------------------------------------------------------- mpsearch search killed mid-pass
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer, saved as a model folder, and a calibration text file."""
    from mpsearch.models import load_model, load_text
    from tests.conftest import tiny_llama

    d = tmp_path_factory.mktemp("tiny")
    lm = load_model("smollm2")
    tiny_llama(vocab=lm.tokenizer.vocab_size).save_pretrained(d / "model")
    lm.tokenizer.save_pretrained(d / "model")
    (d / "calib.txt").write_text(load_text("austen:emma").text[:30000])
    return d


def search_args(tiny: Path, out: Path, proxy: str = "fisher", measure: bool = False) -> list[str]:
    return [
        "search",
        "--model",
        str(tiny / "model"),
        "--calibration",
        str(tiny / "calib.txt"),
        "--evaluation",
        "austen:northangerabbey",
        "--proxy",
        proxy,
        "--budget",
        "4.0",
        "--no-baselines",
        "--refine",
        "0",
        "--no-profile",
        "--no-tasks",
        "--calib-chunks",
        "4",
        "--calib-seq-len",
        "64",
        "--eval-chunks",
        "1",
        "--eval-seq-len",
        "64",
        "--checkpoint-every",
        "0",
        "--threads",
        "1",
        "--out",
        str(out),
    ] + ([] if measure else ["--no-measure"])


def run_search(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPSEARCH_CACHE": str(cache)}
    res = subprocess.run(
        [sys.executable, "-m", "mpsearch.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def kill_at(what: str, n: int, args: list[str], cache: Path, tmp_path: Path) -> None:
    """Start the search, let it stop dead after the n-th save of ``what``, and SIGKILL it there."""
    marker = tmp_path / f"stalled-{what}"
    env = {**os.environ, "MPSEARCH_CACHE": str(cache)}
    p = subprocess.Popen(
        [sys.executable, "-m", "tests.procs.stalling_search", what, str(n), str(marker), "--", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: marker.exists() or p.poll() is not None, timeout=300, what=f"save {n} of {what}")
    assert p.poll() is None, p.stderr.read()[-3000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


def entry_body(path: Path) -> bytes:
    return path.read_bytes().partition(b"\n")[2]


def primitives_of(cache: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = (cache / "primitives").glob("gradients-*[0-9a-f].safetensors")
    return load_file(str(path))


def test_kill_9_search_mid_primitive_pass_the_rerun_resumes_at_the_next_sequence(tiny_model_dir, tmp_path):
    whole = tmp_path / "whole-cache"
    run_search(search_args(tiny_model_dir, tmp_path / "whole"), whole)

    cache = tmp_path / "cache"
    kill_at("primitives", 2, search_args(tiny_model_dir, tmp_path / "a"), cache, tmp_path)  # 2 of 4 sequences done
    assert list((cache / "primitives").glob("*.partial.safetensors"))
    rerun = run_search(search_args(tiny_model_dir, tmp_path / "b"), cache)
    assert "after 2 finished sequences" in rerun.stderr  # resumed, not restarted
    assert not list((cache / "primitives").glob("*.partial.safetensors"))
    got, want = primitives_of(cache), primitives_of(whole)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (
        json.loads((tmp_path / "b" / "plans" / "fisher-milp@4.0.json").read_text())["tensors"]
        == json.loads((tmp_path / "whole" / "plans" / "fisher-milp@4.0.json").read_text())["tensors"]
    )


def test_kill_9_search_mid_measured_kl_pass_the_rerun_measures_only_the_rest(tiny_model_dir, tmp_path):
    whole = tmp_path / "whole-cache"
    run_search(search_args(tiny_model_dir, tmp_path / "whole", "measured_kl"), whole)
    (want,) = (whole / "sensitivity").glob("*.json")
    pairs = len(json.loads(entry_body(want)))

    cache = tmp_path / "cache"
    kill_at("kl", 1, search_args(tiny_model_dir, tmp_path / "a", "measured_kl"), cache, tmp_path)  # layer 0 of 2 saved
    (saved,) = (cache / "sensitivity").glob("*.json")
    first = len(json.loads(entry_body(saved)))
    assert 0 < first < pairs
    rerun = run_search(search_args(tiny_model_dir, tmp_path / "b", "measured_kl"), cache)
    assert (
        f"{first} of {pairs} (tensor, format) pairs cached by an earlier run; measuring the other {pairs - first}"
        in rerun.stderr
    )
    assert json.loads(entry_body(saved)) == json.loads(entry_body(want))  # the same values as one uninterrupted pass


def test_two_searches_on_one_cache_at_once(tiny_model_dir, tmp_path):
    """Two searches write the same entries at the same moment: neither crashes nor reads a torn entry."""
    cache = tmp_path / "cache"
    env = {**os.environ, "MPSEARCH_CACHE": str(cache)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "mpsearch.cli", *search_args(tiny_model_dir, tmp_path / f"run{i}", measure=True)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in runs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        assert "unusable" not in err  # no entry was found corrupt
    tables = [pd.read_csv(tmp_path / f"run{i}" / "results.csv") for i in range(2)]
    pd.testing.assert_frame_equal(tables[0][["plan", "ppl", "kl"]], tables[1][["plan", "ppl", "kl"]])
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]  # no temporary file left behind
    third = run_search(search_args(tiny_model_dir, tmp_path / "run2", measure=True), cache)  # every entry reads back
    assert "unusable" not in third.stderr
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "run2" / "results.csv")[["plan", "ppl", "kl"]], tables[0][["plan", "ppl", "kl"]]
    )
