"""Throughput of `mpsearch worker`: measured plans per minute with 1 and 2 workers, journal and PostgreSQL.

For each storage and worker count, `mpsearch evolve --no-work` creates a fresh study on the
default model (SmolLM2-135M) and N `mpsearch worker` processes share its trials, with
``2 // N`` torch threads each (the machine's cores split between them). Each configuration
has its own evaluation cache (models, data and primitives are shared read-only), so no plan
is answered from an earlier configuration's measurement.

- ``plans_per_min``: plans measured (repeats answered by the study not counted) between the
  first trial's start and the last trial's end; worker start-up (loading the model, primitives
  and the reference log-probs) is outside that window and reported in the JSON.
- ``overhead_s_per_trial``: worker-seconds per trial when measuring costs nothing (the toy
  worker of tests/procs, 60 trials): the storage's reads and writes, the heartbeat and
  NSGA-II's sampling; everything a trial costs besides its measurement.

The PostgreSQL server is started here from Debian's binaries (tests/postgres.py) and removed
at the end. Writes benchmarks/results/workers.csv (storage, workers, plans_per_min,
overhead_s_per_trial) and workers.json (settings, machine, per-run details).

    .venv/bin/python benchmarks/workers.py            # about 12 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"
SEARCH = [
    "--budget",
    "uniform:3",
    "--population",
    "4",
    "--calib-chunks",
    "2",
    "--calib-seq-len",
    "256",
    "--eval-chunks",
    "4",
    "--eval-seq-len",
    "256",
    "--quiet",
]


def study(url: str, name: str):
    import optuna

    from mpsearch.store.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=open_storage(url, 10))


def window_minutes(trials) -> float:
    done = [t for t in trials if t.state.name == "COMPLETE"]
    return (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds() / 60


def fresh_cache(base: Path, where: Path) -> Path:
    """A cache sharing ``base``'s converted model, data and primitives, with no evaluations."""
    where.mkdir(parents=True)
    for sub in base.iterdir():
        if sub.name not in ("evals", "tasks"):
            (where / sub.name).symlink_to(sub)
    return where


def measured_throughput(url: str, workers: int, trials: int, base_cache: Path, tmp: Path) -> dict:
    name = f"bench-{workers}"
    env = {**os.environ, "MPSEARCH_CACHE": str(fresh_cache(base_cache, tmp / f"cache-{workers}"))}
    cmd = [sys.executable, "-m", "mpsearch.cli"]
    subprocess.run(
        cmd
        + [
            "evolve",
            *SEARCH,
            "--trials",
            str(trials),
            "--storage",
            url,
            "--study-name",
            name,
            "--no-work",
            "--out",
            str(tmp / f"evo-{workers}"),
        ],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            cmd + ["worker", "--study", name, "--storage", url, "--threads", str(max(1, 2 // workers)), "--quiet"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(workers)
    ]
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed:\n{out[-3000:]}")
    wall = time.monotonic() - start
    trials_ = study(url, name).get_trials(deepcopy=False)
    measured = [
        t
        for t in trials_
        if t.state.name == "COMPLETE" and t.user_attrs.get("measured") and not t.user_attrs.get("duplicate")
    ]
    minutes = window_minutes(trials_)
    return {
        "plans": len(measured),
        "trials": sum(t.state.name == "COMPLETE" for t in trials_),
        "minutes": minutes,
        "plans_per_min": len(measured) / minutes,
        "wall_s_with_startup": wall,
    }


def overhead(url: str, workers: int, trials: int, tmp: Path) -> dict:
    from mpsearch.run.evolution import EvolutionConfig, evolve
    from tests.procs.toy_worker import toy_space

    evolve(
        toy_space(12),
        None,
        url,
        EvolutionConfig(trials=trials, population=8, study_name="toy"),
        progress=False,
        work=False,
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.procs.toy_worker",
                url,
                str(tmp / f"toy-{workers}.log"),
                "--sleep",
                "0",
                "--decisions",
                "12",
                "--heartbeat",
                "10",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(workers)
    ]
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"toy worker failed:\n{out[-3000:]}")
    trials_ = study(url, "toy").get_trials(deepcopy=False)
    done = sum(t.state.name == "COMPLETE" for t in trials_)
    return {"toy_trials": done, "overhead_s_per_trial": workers * window_minutes(trials_) * 60 / done}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=16, help="trials per study on the real model (default 16)")
    p.add_argument("--toy-trials", type=int, default=60, help="trials per study for the overhead (default 60)")
    p.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    p.add_argument("--storages", default="journal,postgresql")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    from tests.postgres import _Server, find_binaries

    counts = [int(w) for w in a.workers.split(",")]
    rows, details = [], []
    with tempfile.TemporaryDirectory(prefix="mpsearch-workers-") as tmp_:
        tmp = Path(tmp_)
        base = Path(os.environ.get("MPSEARCH_CACHE", Path.home() / ".cache" / "mpsearch"))
        # warm the shared part once (model, data, primitives), so start-up is the same for every run
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mpsearch.cli",
                "evolve",
                *SEARCH,
                "--trials",
                "1",
                "--no-work",
                "--out",
                str(tmp / "warm"),
            ],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
        server = None
        try:
            for storage in a.storages.split(","):
                for n in counts:
                    run = tmp / f"{storage}-{n}"
                    run.mkdir()
                    if storage == "journal":
                        url, toy_url = str(run / "study.log"), str(run / "toy.log")
                    else:
                        if server is None:
                            server = _Server(*find_binaries())
                            server.init(), server.start(), server.wait_ready(), server.create_database()
                        url = toy_url = _database(server.url, f"bench_{n}")
                    print(f"[workers] {storage}, {n} worker(s): real model ...", flush=True)
                    real = measured_throughput(url, n, a.trials, base, run)
                    print(f"[workers] {storage}, {n} worker(s): overhead ...", flush=True)
                    over = overhead(toy_url, n, a.toy_trials, run)
                    rows.append(
                        {
                            "storage": storage,
                            "workers": n,
                            "plans_per_min": round(real["plans_per_min"], 2),
                            "overhead_s_per_trial": round(over["overhead_s_per_trial"], 4),
                        }
                    )
                    details.append({"storage": storage, "workers": n, **real, **over})
                    print(f"[workers] {rows[-1]}", flush=True)
        finally:
            if server is not None:
                server.cleanup()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "workers.csv", index=False)
    import torch

    (out / "workers.json").write_text(
        json.dumps(
            {
                "model": "smollm2 (SmolLM2-135M)",
                "settings": " ".join(SEARCH),
                "trials": a.trials,
                "toy_trials": a.toy_trials,
                "threads_per_worker": {n: max(1, 2 // n) for n in counts},
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "torch": torch.__version__,
                "runs": details,
            },
            indent=1,
        )
    )
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


def _database(server_url: str, name: str) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name


if __name__ == "__main__":
    sys.exit(main())
