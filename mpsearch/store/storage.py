"""Where a study lives, so that many workers can share it and a killed one is noticed.

A study is a storage URL, opened by :func:`open_storage`:

- **a file path**: an Optuna journal file. No server; workers on one machine (or on a
  shared filesystem with working ``flock``) append to it. Optuna 5's journal has no
  heartbeat, so :class:`HeartbeatJournal` adds one: each running trial touches a file
  beside the journal, and a trial whose file is older than the grace period, or whose
  process on this machine is gone, is stale.
- **a database URL** (``postgresql+psycopg2://...``, ``sqlite:///study.db``): Optuna's
  RDB storage with its own heartbeats. This is how workers on many machines share one study.

Both fail a stale trial through Optuna's ``fail_stale_trials`` (run at the start of each
trial) and retry it with ``RetryHeartbeatStaleTrialCallback`` (Optuna 5's name for
``RetryFailedTrialCallback``): its plan is enqueued again.

Plans are measured once per study whatever the number of workers: :func:`claims_for` gives
a :class:`Claims` table, one owner trial per plan hash, claimed atomically (a file lock for a
journal, a primary key for a database).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from ..core.files import write_text_atomic

log = logging.getLogger(__name__)

#: seconds between a running trial's heartbeats, and how long a silent trial lives on
HEARTBEAT_S = 10
GRACE_FACTOR = 3
#: times a trial failed by its heartbeat is enqueued again
MAX_RETRY = 3


def is_database(url: str | Path) -> bool:
    return "://" in str(url)


def open_storage(url: str | Path, heartbeat: int = HEARTBEAT_S, max_retry: int = MAX_RETRY):
    """The Optuna storage behind ``url``, with heartbeats every ``heartbeat`` seconds
    (stale after ``GRACE_FACTOR`` of them) and stale trials retried up to ``max_retry`` times."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback  # Optuna 5's name for RetryFailedTrialCallback

    if heartbeat < 1:
        raise ValueError(f"heartbeat must be at least 1 second, got {heartbeat}")
    with warnings.catch_warnings():  # marked experimental since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    if not is_database(url):
        return HeartbeatJournal(url, heartbeat, heartbeat * GRACE_FACTOR, retry)
    if str(url).startswith("postgresql"):
        _require_driver(str(url))
    with warnings.catch_warnings():  # heartbeat_interval is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            str(url),
            heartbeat_interval=heartbeat,
            grace_period=heartbeat * GRACE_FACTOR,
            heartbeat_stale_trial_callback=retry,
            engine_kwargs={"pool_pre_ping": True} if not str(url).startswith("sqlite") else None,
        )


def _require_driver(url: str) -> None:
    driver = url.split("://")[0].partition("+")[2] or "psycopg2"
    try:
        __import__(driver)
    except ImportError:
        raise ValueError(
            f"storage {url.split('@')[-1]!r} needs the PostgreSQL driver {driver!r}: "
            "pip install psycopg2-binary (scripts/setup.sh installs it)"
        ) from None


# ---------------------------------------------------------------- journal with heartbeats
def repair_journal(path: str | Path) -> int:
    """Cut unreadable lines off the end of an Optuna journal file; return how many bytes were cut.

    Optuna appends one JSON object per line. An append cut short leaves a last line
    without its newline; Optuna skips it on read, but its next append continues that
    line and the study becomes unreadable for good. The cut bytes are kept beside the
    journal (``<name>.torn``). A bad line *before* a good one is not a torn write: that
    is an error naming the line.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")  # the part after the last newline is lines[-1] (b"" when none is torn)
    good = len(lines) - 1
    while good > 0:
        try:
            json.loads(lines[good - 1])
            break
        except (UnicodeDecodeError, json.JSONDecodeError):
            good -= 1
    for i, line in enumerate(lines[:good]):
        try:
            json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(
                f"{path}: line {i + 1} of the study journal is corrupt and later lines are not; "
                "it cannot be repaired automatically"
            ) from None
    tail_start = sum(len(x) + 1 for x in lines[:good])
    if tail_start == len(data):
        return 0
    torn = path.with_name(path.name + ".torn")
    with open(torn, "ab") as f:
        f.write(data[tail_start:] + b"\n")
    with open(path, "r+b") as f:
        f.truncate(tail_start)
    log.warning(
        "%s: cut %d bytes of a torn write off the end of the study journal (kept in %s)",
        path,
        len(data) - tail_start,
        torn,
    )
    return len(data) - tail_start


def _journal_base():
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    return JournalStorage, BaseHeartbeat


_JournalStorage, _BaseHeartbeat = _journal_base()


class HeartbeatJournal(_JournalStorage, _BaseHeartbeat):
    """Optuna's journal storage plus heartbeats kept as files in ``<journal>.heartbeats/``.

    A heartbeat file names the host and process of its trial: on this host a trial whose
    process is gone is stale at once (a resumed run does not wait out the grace period);
    elsewhere it is stale when the file is ``grace`` seconds old.
    """

    def __init__(self, path: str | Path, interval: int, grace: int, retry) -> None:
        from optuna.storages.journal import JournalFileBackend

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(self.path)
        super().__init__(JournalFileBackend(str(self.path)))
        self.beats = self.path.with_name(self.path.name + ".heartbeats")
        self.beats.mkdir(exist_ok=True)
        self.interval, self.grace, self.retry = interval, grace, retry
        self.host = socket.gethostname()

    def record_heartbeat(self, trial_id: int) -> None:
        write_text_atomic(self.beats / str(trial_id), f"{self.host} {os.getpid()}")

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        from optuna.trial import TrialState

        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = self.beats / str(t._trial_id)
            try:
                host, pid = beat.read_text().split()
                age = now - beat.stat().st_mtime
            except (OSError, ValueError):  # no heartbeat yet: count from the trial's start
                start = t.datetime_start or datetime.now(timezone.utc)
                host, pid, age = "", "0", now - start.replace(tzinfo=start.tzinfo or timezone.utc).timestamp()
            if age > self.grace or (host == self.host and not _alive(int(pid))):
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.interval

    def get_heartbeat_stale_trial_callback(self):
        return self.retry

    def set_trial_state_values(self, trial_id: int, state, values=None) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if state.is_finished():
            (self.beats / str(trial_id)).unlink(missing_ok=True)
        return changed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ---------------------------------------------------------------- plan claims
class Claims(Protocol):
    """One owner trial per plan: whoever claims a plan first measures it; the others wait for its result."""

    def claim(self, plan: str, trial_id: int) -> int:
        """Claim ``plan`` for ``trial_id`` unless it is claimed; return its owner."""

    def replace(self, plan: str, dead: int, trial_id: int) -> int:
        """Take ``plan`` over from the failed trial ``dead`` (if another worker has not already); return its owner."""


def claims_for(storage, study_name: str) -> Claims:
    """The claims table of a study's storage (never a per-process one for a shared storage)."""
    import optuna
    from optuna.storages._cached_storage import _CachedStorage

    if isinstance(storage, _CachedStorage):  # Optuna wraps an RDB storage in a cache
        storage = storage._backend
    if isinstance(storage, HeartbeatJournal):
        return FileClaims(storage.path.with_name(f"{storage.path.name}.claims"), study_name)
    if hasattr(storage, "engine"):
        return SQLClaims(storage.engine, study_name)
    if isinstance(storage, optuna.storages.InMemoryStorage):
        return MemoryClaims()
    raise ValueError(f"no plan claims for a {type(storage).__name__}: use a journal file or a database URL")


class FileClaims:
    """Claims in a JSON-lines file beside the journal, read and appended under an exclusive ``flock``."""

    def __init__(self, path: Path, study: str) -> None:
        self.path, self.study = path, study
        self.lock = path.with_name(path.name + ".lock")

    def _owners(self) -> dict[str, int]:
        owners: dict[str, int] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    study, plan, trial = json.loads(line)
                except (ValueError, TypeError):  # a torn line from a killed writer
                    continue
                if study == self.study:
                    owners[plan] = int(trial)
        return owners

    def _locked(self, plan: str, write) -> int:
        with open(self.lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                owners = self._owners()
                mine = write(owners.get(plan))
                if mine is not None:
                    with open(self.path, "a") as f:
                        f.write(
                            "\n" + json.dumps([self.study, plan, mine]) + "\n"
                        )  # the leading newline ends a torn line
                        f.flush()
                        os.fsync(f.fileno())
                    return mine
                return owners[plan]
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def claim(self, plan: str, trial_id: int) -> int:
        return self._locked(plan, lambda owner: trial_id if owner is None else None)

    def replace(self, plan: str, dead: int, trial_id: int) -> int:
        return self._locked(plan, lambda owner: trial_id if owner in (None, dead) else None)


class SQLClaims:
    """Claims in a table of the study's database; its primary key (study, plan) makes a claim atomic."""

    def __init__(self, engine, study: str) -> None:
        import sqlalchemy as sa

        self.engine, self.study = engine, study
        meta = sa.MetaData()
        self.table = sa.Table(
            "mpsearch_plan_claims",
            meta,
            sa.Column("study", sa.String(512), primary_key=True),
            sa.Column("plan", sa.String(64), primary_key=True),
            sa.Column("trial_id", sa.Integer, nullable=False),
        )
        try:
            meta.create_all(engine, checkfirst=True)
        except sa.exc.SQLAlchemyError:  # another worker created it between the check and the create
            meta.create_all(engine, checkfirst=True)

    def _owner(self, conn, plan: str) -> int:
        t = self.table
        return int(conn.execute(t.select().where(t.c.study == self.study, t.c.plan == plan)).one().trial_id)

    def claim(self, plan: str, trial_id: int) -> int:
        import sqlalchemy as sa

        try:
            with self.engine.begin() as conn:
                conn.execute(self.table.insert().values(study=self.study, plan=plan, trial_id=trial_id))
            return trial_id
        except sa.exc.IntegrityError:
            with self.engine.connect() as conn:
                return self._owner(conn, plan)

    def replace(self, plan: str, dead: int, trial_id: int) -> int:
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(
                t.update()
                .where(t.c.study == self.study, t.c.plan == plan, t.c.trial_id == dead)
                .values(trial_id=trial_id)
            )
            return self._owner(conn, plan)


class MemoryClaims:
    """For an in-memory storage: one process, so a dict is atomic enough."""

    def __init__(self) -> None:
        self.owners: dict[str, int] = {}

    def claim(self, plan: str, trial_id: int) -> int:
        return self.owners.setdefault(plan, trial_id)

    def replace(self, plan: str, dead: int, trial_id: int) -> int:
        if self.owners.get(plan) == dead:
            self.owners[plan] = trial_id
        return self.owners[plan]
