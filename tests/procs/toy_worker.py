"""A worker on the toy space of tests/test_evolution.py, as its own process.

``python -m tests.procs.toy_worker STORAGE LOG [--sleep S] [--stall-at N] [--heartbeat H]``
measures trials of the study ``toy`` until its budget is spent. Each measurement appends
``<pid> start <hash>`` and ``<pid> done <hash>`` to LOG and takes S seconds; with
``--stall-at N`` the N-th measurement never finishes (the test kills the process there).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def toy_space(n: int = 6):
    from mpsearch.run.evolution import Space

    bits = np.array([2.0, 3.0, 4.0, 8.0])
    return Space(
        tuple(f"d{i}" for i in range(n)), (("b2", "b3", "b4", "b8"),) * n, tuple(bits * 100 for _ in range(n)), 100 * n
    )


def toy_quality(choice) -> dict:
    kl = sum(2.0 ** (-2 * (j + 1)) * (i + 1) for i, j in enumerate(choice))
    return {"kl": kl, "ppl": 10 * (1 + kl), "nll": kl}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("storage")
    p.add_argument("log")
    p.add_argument("--sleep", type=float, default=0.2)
    p.add_argument("--stall-at", type=int, default=0)
    p.add_argument("--heartbeat", type=int, default=1)
    p.add_argument("--decisions", type=int, default=6)
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args()

    import optuna

    from mpsearch.run.evolution import open_study, run_trials, study_config
    from mpsearch.store.storage import open_storage

    space = toy_space(a.decisions)
    storage = open_storage(a.storage, a.heartbeat)
    config = study_config(optuna.load_study(study_name="toy", storage=storage))
    calls = 0

    def measure(choice):
        nonlocal calls
        calls += 1
        key = space.plan_hash(choice)
        with open(a.log, "a") as f:
            f.write(f"{os.getpid()} start {key}\n")
        if calls == a.stall_at:
            time.sleep(3600)
        time.sleep(a.sleep)
        with open(a.log, "a") as f:
            f.write(f"{os.getpid()} done {key}\n")
        return toy_quality(choice)

    study = open_study(space, storage, config, a.seed if a.seed is not None else os.getpid(), owner=False)
    run_trials(study, space, measure, config, progress=False, poll=0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
