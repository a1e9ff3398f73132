"""A throwaway PostgreSQL server for the Optuna RDB-storage tests.

``postgres_url`` (session scope) runs ``initdb`` into a fresh temporary folder, starts the
server with ``pg_ctl`` on a free TCP port of 127.0.0.1 (trust authentication, fsync off),
creates the database ``mpsearch`` and yields its SQLAlchemy URL
(``postgresql+psycopg2://mpsearch@127.0.0.1:PORT/mpsearch``). The server is stopped and the
folder removed at the end of the session, also when a test or the start fails.

PostgreSQL refuses to run as root: under root, ``initdb`` and ``pg_ctl`` run as the
unprivileged user ``postgres`` (created by Debian's postgresql package; ``runuser -u``, or
``su -s /bin/sh -c`` without runuser), and the temporary folder (under /tmp) belongs to it.

Without the PostgreSQL binaries (``scripts/setup.sh`` installs Debian's ``postgresql``) or
the driver (``psycopg2-binary``, in the ``test`` extra) the tests that use the fixture are
skipped, or fail when ``MPSEARCH_REQUIRE_POSTGRES=1`` (``scripts/test.sh``, CI).

Only the standard library and pytest are imported here: tests/conftest.py imports this module.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

USER = "mpsearch"  # the superuser initdb creates, and the database the fixture creates
DATABASE = "mpsearch"
RUN_AS = "postgres"  # the unprivileged user the server runs as under root (Debian's package creates it)
START_TIMEOUT = 60  # seconds pg_ctl waits for the server to accept connections


def _unavailable(reason: str):
    """Skip, or fail under ``MPSEARCH_REQUIRE_POSTGRES=1`` (CI must not skip silently)."""
    if os.environ.get("MPSEARCH_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL required (MPSEARCH_REQUIRE_POSTGRES=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


def _version_key(bindir: str) -> tuple:
    """/usr/lib/postgresql/15/bin -> (15,); 9.6 -> (9, 6): newest sorts last."""
    version = Path(bindir).parent.name
    return tuple(int(p) for p in re.findall(r"\d+", version)) or (-1,)


def find_binaries() -> tuple[str, str] | None:
    """``(initdb, pg_ctl)`` from PATH, else from the newest /usr/lib/postgresql/*/bin; None if absent."""
    initdb = shutil.which("initdb")
    if initdb:
        # pg_ctl of the same installation (a symlink on PATH may point into /usr/lib/postgresql/N/bin)
        for d in (os.path.dirname(initdb), os.path.dirname(os.path.realpath(initdb))):
            if os.access(os.path.join(d, "pg_ctl"), os.X_OK):
                return initdb, os.path.join(d, "pg_ctl")
        if shutil.which("pg_ctl"):
            return initdb, shutil.which("pg_ctl")
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        initdb, pg_ctl = os.path.join(bindir, "initdb"), os.path.join(bindir, "pg_ctl")
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            return initdb, pg_ctl
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """initdb + pg_ctl in one temporary folder, as ``RUN_AS`` under root."""

    def __init__(self, initdb: str, pg_ctl: str):
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.as_root = os.geteuid() == 0
        self.uid = self.gid = None
        if self.as_root:
            import pwd

            try:
                pw = pwd.getpwnam(RUN_AS)
            except KeyError:
                _unavailable(
                    f"running as root and there is no user {RUN_AS!r} to run the server as "
                    "(PostgreSQL refuses root; Debian's postgresql package creates that user)"
                )
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
        # a short folder under /tmp: the Unix socket path must stay under ~107 bytes, and under
        # root the user RUN_AS must reach it (/tmp is world-traversable; $TMPDIR may not be)
        base = "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else None
        self.root = Path(tempfile.mkdtemp(prefix="mpsearch-pg-", dir=base))  # mode 0o700
        self.data, self.sock, self.log = self.root / "data", self.root / "sock", self.root / "server.log"
        self.sock.mkdir()
        if self.as_root:
            os.chown(self.root, self.uid, self.gid)
            os.chown(self.sock, self.uid, self.gid)
        self.port: int | None = None
        self.started = False

    def _cmd(self, argv: list[str]) -> list[str]:
        if not self.as_root:
            return argv
        if shutil.which("runuser"):
            return ["runuser", "-u", RUN_AS, "--", *argv]
        return ["su", RUN_AS, "-s", "/bin/sh", "-c", shlex.join(argv)]

    def run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        # cwd: the folder RUN_AS owns (it may not be able to enter the caller's working directory)
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        return subprocess.run(self._cmd(argv), cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError as e:
            return f"(no server log: {e})"

    def init(self) -> None:
        help_text = self.run([self.initdb, "--help"]).stdout
        argv = [self.initdb, "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C"]
        if "--no-sync" in help_text:
            argv.append("--no-sync")
        elif "--nosync" in help_text:  # PostgreSQL < 10
            argv.append("--nosync")
        r = self.run(argv)
        if r.returncode != 0:
            pytest.fail(
                f"initdb failed (exit {r.returncode}): {shlex.join(argv)}\n"
                f"--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}",
                pytrace=False,
            )

    def start(self, attempts: int = 3) -> None:
        """Start on a free port; a port taken between the probe and the start gets another try."""
        for attempt in range(attempts):
            self.port = _free_port()
            options = (
                f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 "
                f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            argv = [
                self.pg_ctl,
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                str(START_TIMEOUT),
                "-o",
                options,
                "start",
            ]
            try:
                r = self.run(argv, timeout=START_TIMEOUT + 30)
                ok, out = (
                    r.returncode == 0,
                    f"exit {r.returncode}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}",
                )
            except subprocess.TimeoutExpired as e:
                ok, out = False, f"timed out after {e.timeout} s"
            self.started = True  # a failed start may still have left a postmaster behind: stop() checks
            if ok:
                return
            log = self.log_text()
            if "could not bind" in log or "already in use" in log:
                if attempt + 1 < attempts:
                    self.stop()
                    continue
            pytest.fail(
                f"pg_ctl start failed: {shlex.join(argv)}\n{out}\n--- server log {self.log} ---\n{log}", pytrace=False
            )

    def wait_ready(self, timeout: float = 30) -> None:
        """Until a client connects over TCP (pg_ctl -w already waited; this checks the driver's path)."""
        import psycopg2

        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                psycopg2.connect(
                    host="127.0.0.1", port=self.port, user=USER, dbname="postgres", connect_timeout=5
                ).close()
                return
            except psycopg2.OperationalError as e:
                last = e
                time.sleep(0.1)
        pytest.fail(
            f"PostgreSQL on 127.0.0.1:{self.port} does not accept connections: {last}\n"
            f"--- server log {self.log} ---\n{self.log_text()}",
            pytrace=False,
        )

    def create_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{DATABASE}" OWNER "{USER}"')
        finally:
            conn.close()

    def stop(self) -> None:
        if self.started and (self.data / "postmaster.pid").exists():
            try:
                self.run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop"], timeout=60)
            except subprocess.TimeoutExpired:
                pass
            pidfile = self.data / "postmaster.pid"
            if pidfile.exists():  # pg_ctl could not stop it: the postmaster we started, by its id
                try:
                    os.kill(int(pidfile.read_text().split()[0]), signal.SIGQUIT)
                    time.sleep(0.5)
                except (OSError, ValueError, IndexError):
                    pass
        self.started = False

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/{DATABASE}"


@pytest.fixture(scope="session")
def postgres_url():
    """SQLAlchemy URL of a fresh PostgreSQL database on a server started for this test session."""
    binaries = find_binaries()
    if binaries is None:
        _unavailable(
            "no initdb/pg_ctl on PATH or under /usr/lib/postgresql/*/bin "
            "(scripts/setup.sh installs Debian's postgresql)"
        )
    try:
        import psycopg2  # noqa: F401
    except ImportError as e:
        _unavailable(f"no PostgreSQL driver for SQLAlchemy ({e}); pip install psycopg2-binary (the 'test' extra)")
    server = _Server(*binaries)
    try:
        server.init()
        server.start()
        server.wait_ready()
        server.create_database()
        yield server.url
    finally:
        server.cleanup()
