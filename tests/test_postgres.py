"""The throwaway PostgreSQL server (tests/postgres.py) and Optuna's RDB storage on it."""

from __future__ import annotations

import pytest


def test_postgres_select_one(postgres_url):
    sqlalchemy = pytest.importorskip("sqlalchemy")

    engine = sqlalchemy.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("select 1")).scalar() == 1
            assert conn.execute(sqlalchemy.text("select current_database()")).scalar() == "mpsearch"
    finally:
        engine.dispose()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # heartbeat_interval
def test_optuna_rdb_storage_round_trip(postgres_url):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(postgres_url, heartbeat_interval=1, grace_period=3)
    study = optuna.create_study(
        study_name="rdb-round-trip",
        storage=storage,
        direction="minimize",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    study.optimize(lambda t: (t.suggest_float("x", -1.0, 1.0) - 0.25) ** 2, n_trials=3)
    written = [(t.number, t.params["x"], t.value) for t in study.trials]

    other = optuna.storages.RDBStorage(postgres_url)  # a second connection pool reads what the first wrote
    loaded = optuna.load_study(study_name="rdb-round-trip", storage=other)
    trials = loaded.trials
    assert len(trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert [(t.number, t.params["x"], t.value) for t in trials] == written
    assert loaded.best_value == min(v for _, _, v in written)
    storage.engine.dispose()
    other.engine.dispose()
