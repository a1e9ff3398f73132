"""A worker: joins an existing evolution study and measures its trials until the budget is spent.

``mpsearch evolve --storage URL`` creates a study and stores in it everything a worker
needs: the search settings, the proxy, the formats searched per decision and the
model's fingerprint. ``mpsearch worker --study NAME --storage URL`` reads them, opens
the same session (model, data and primitives, from its own cache), checks that its model
is the study's, and runs :func:`mpsearch.run.evolution.run_trials`. Any number of workers
may run at once, on one machine (a journal file) or many (PostgreSQL): see
:mod:`mpsearch.store.storage` for heartbeats and plan claims.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)


def load_study_info(storage, study_name: str):
    """The study and what ``mpsearch evolve`` stored in it; a clear error if it is missing or foreign."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise ValueError(
            f"no study {study_name!r} in this storage (it holds: {', '.join(names) or 'none'}); "
            "create it with `mpsearch evolve --storage URL --study-name NAME`"
        ) from None
    info = study.user_attrs.get("search")
    if not info:
        raise ValueError(f"study {study_name!r} was not created by `mpsearch evolve` (it stores no search settings)")
    return study, info


def run_worker(
    storage: str | Path,
    study_name: str = "mpsearch",
    *,
    threads: int = 2,
    device: str | None = None,
    progress: bool = True,
    use_cache: bool = True,
    heartbeat: int | None = None,
    sampler_seed: int | None = None,
    out_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Measure trials of the study ``study_name`` in ``storage`` until it holds its trial budget; return every trial.

    ``sampler_seed`` defaults to one drawn from the process id and the clock, so workers
    started together propose different plans. ``out_dir`` also writes the study's results
    there (trials.csv, front.csv, plans), as ``mpsearch evolve`` does.
    """
    from ..store.storage import HEARTBEAT_S, is_database, open_storage
    from .config import config_from_dict
    from .evolution import open_study, original, run_trials, study_config, trials_table, write_study_outputs
    from .session import Session

    if not is_database(storage) and not Path(storage).is_file():
        raise FileNotFoundError(
            f"no study journal at {storage}: give the file `mpsearch evolve --storage` wrote (default OUT/study.log)"
        )
    store = open_storage(storage, heartbeat or HEARTBEAT_S)
    study, info = load_study_info(store, study_name)
    overrides = {"threads": threads, "progress": progress, "use_cache": use_cache}
    if device is not None:
        overrides["device"] = device
    cfg = config_from_dict(info["config"], **overrides)
    config = study_config(study)
    session = Session.open(cfg)
    if session.fingerprint != info["fingerprint"]:
        raise ValueError(
            f"this worker's model {cfg.model!r} has fingerprint {session.fingerprint}, the study's is "
            f"{info['fingerprint']}: every worker must measure the same model"
        )
    kept = [list(map(int, k)) for k in info["kept"]]
    space = _kept_space(session.problem(info["proxy"]), session.numel, kept)
    seed = sampler_seed if sampler_seed is not None else (os.getpid() * 1_000_003 + time.time_ns()) % 2**31
    study = open_study(space, store, config, seed, owner=False)
    log.info("worker %d joins study %r: %d trials in all", os.getpid(), study_name, config.trials)
    run_trials(study, space, lambda c: session.measure_choice(original(kept, c)), config, progress)
    if out_dir is not None:
        return write_study_outputs(session, study, space, kept, info["proxy"], config, Path(out_dir))
    return trials_table(study)


def _kept_space(problem, numel: int, kept: list[list[int]]):
    """The study's space: per decision, the full problem's options at the stored indices."""
    from .evolution import Space

    if len(kept) != len(problem.decisions) or any(max(k, default=-1) >= len(o) for k, o in zip(kept, problem.options)):
        raise ValueError("the study's formats do not match this session's decisions (another search space or rules?)")
    return Space(
        problem.decisions,
        tuple(tuple(problem.options[i][j] for j in k) for i, k in enumerate(kept)),
        tuple(problem.cost[i][k] for i, k in enumerate(kept)),
        numel,
    )
