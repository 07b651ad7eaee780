"""A throw-away PostgreSQL server on 127.0.0.1 for tests (Debian's ``postgresql`` package).

``scripts/install-postgres.sh`` installs the server and creates the unprivileged user it runs
as (PostgreSQL refuses to run as root); this module never installs anything. The binaries
come from the highest ``/usr/lib/postgresql/<version>/bin`` (they are not on ``PATH``).

Usage::

    with PostgresServer(tmp_path) as pg:
        url = pg.create_database("notifications")   # postgresql://postgres:PW@127.0.0.1:PORT/...

Layout: the cluster (data directory, password file, Unix socket directory) lives in a fresh
directory of its own under ``run_base`` (default: the system temp dir), owned by the server
user and mode 0700, because pytest's ``tmp_path`` sits below a root-only (0700) directory the
server user cannot enter; ``workdir`` gets the server log (written through a descriptor we
open) and a ``cluster`` symlink to that directory. Connections: TCP on 127.0.0.1 only, with
SCRAM-SHA-256 and a random superuser password (part of :attr:`url`); over the Unix socket
(mode 0700, so only the server user) ``trust``.

``stop()`` and ``kill()`` keep the cluster, so ``start()`` again brings the same databases
back on the same port (crash recovery after ``kill()``); ``close()`` (and leaving the
``with`` block) stops the server and deletes the cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from devstack.pacifica import HOST, _live_group_members, _tail, free_port

DEFAULT_USER = "downloader-pg"
SUPERUSER = "postgres"
INSTALL_HINT = "run scripts/install-postgres.sh (as root)"
_DB_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def postgres_bindir() -> Path:
    """The ``bin`` directory of the highest installed PostgreSQL version (RuntimeError if none)."""
    candidates = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        version = Path(initdb).parent.parent.name
        if os.access(initdb, os.X_OK) and version.replace(".", "").isdigit():
            candidates.append((tuple(int(part) for part in version.split(".")), Path(initdb).parent))
    if not candidates:
        raise RuntimeError(
            f"PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): {INSTALL_HINT}"
        )
    return max(candidates)[1]


class PostgresServer:
    """One PostgreSQL cluster and its postmaster, listening on 127.0.0.1:``port``."""

    def __init__(
        self,
        workdir: Path,
        user: str = DEFAULT_USER,
        host: str = HOST,
        max_connections: int = 300,
        run_base: Path | None = None,
    ):
        self.workdir = Path(workdir).resolve()
        self.user = user
        self.host = host
        self.max_connections = max_connections
        self.run_base = Path(run_base or tempfile.gettempdir())
        self.port = 0
        self.password = secrets.token_urlsafe(24)
        self.pid: int | None = None
        self.startup_seconds: float | None = None
        self.run_dir: Path | None = None
        self._bindir: Path | None = None
        self._initialized = False

    # ------------------------------------------------------------------ paths
    @property
    def data_dir(self) -> Path:
        return self._run_dir() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._run_dir() / "socket"

    @property
    def log(self) -> Path:
        return self.workdir / "postgres.log"

    def _run_dir(self) -> Path:
        if self.run_dir is None:
            raise RuntimeError("PostgresServer not started")
        return self.run_dir

    def _bin(self, name: str) -> str:
        assert self._bindir is not None
        return str(self._bindir / name)

    # ------------------------------------------------------------------- URLs
    def url_for(self, database: str) -> str:
        """``postgresql://postgres:PASSWORD@127.0.0.1:PORT/<database>`` (psycopg, SQLAlchemy, peewee)."""
        if not self.port:
            raise RuntimeError("PostgresServer not started")
        password = urllib.parse.quote(self.password, safe="")
        return f"postgresql://{SUPERUSER}:{password}@{self.host}:{self.port}/{database}"

    @property
    def url(self) -> str:
        """The URL of the ``postgres`` database (as the superuser)."""
        return self.url_for("postgres")

    # --------------------------------------------------------------- commands
    def _as_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", self.user, "--", *argv]
        return argv  # not root: we are already unprivileged (and own everything we make)

    def _run(self, argv: list[str], timeout: float, as_user: bool = True) -> subprocess.CompletedProcess[str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        env["PGPASSWORD"] = self.password
        return subprocess.run(
            self._as_user(argv) if as_user else argv,
            env=env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _check(self, what: str, result: subprocess.CompletedProcess[str]) -> None:
        if result.returncode != 0:
            raise self._failure(
                f"{what} failed (exit {result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )

    def _failure(self, message: str) -> RuntimeError:
        return RuntimeError(f"{message}\n--- {self.log} ---\n{_tail(self.log)}")

    # -------------------------------------------------------------- lifecycle
    def _initdb(self, timeout: float) -> None:
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam(self.user)
            except KeyError:
                raise RuntimeError(f"no user {self.user!r} to run PostgreSQL as: {INSTALL_HINT}") from None
            uid, gid = account.pw_uid, account.pw_gid
        else:
            uid, gid = os.getuid(), os.getgid()
        self.run_base.mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix="downloader-pg-", dir=self.run_base))
        self.socket_dir.mkdir()
        pwfile = self.run_dir / "pwfile"
        pwfile.write_text(self.password + "\n", encoding="utf-8")
        for path in (self.run_dir, self.socket_dir, pwfile):
            os.chown(path, uid, gid)
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
        link = self.workdir / "cluster"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(self.run_dir)
        result = self._run(
            [
                self._bin("initdb"),
                "--pgdata",
                str(self.data_dir),
                "--username",
                SUPERUSER,
                "--pwfile",
                str(pwfile),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                # A test cluster: skipping initdb's final fsync of every file saves seconds.
                "--no-sync",
            ],
            timeout,
        )
        pwfile.unlink()
        self._check("initdb", result)
        self._initialized = True

    def start(self, timeout: float = 60) -> PostgresServer:
        """Create the cluster (first time), start the server, wait until it takes a connection."""
        if self.pid is not None:
            raise RuntimeError("PostgresServer already started")
        self._bindir = postgres_bindir()
        began = time.monotonic()
        deadline = began + timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.close)
        try:
            if not self._initialized:
                self._initdb(timeout)
            self._drop_stale_pid_file()
            fixed_port = bool(self.port)  # a restart keeps its port: URLs handed out stay valid
            for _attempt in range(1 if fixed_port else 3):
                if not fixed_port:
                    self.port = free_port(self.host)
                if self._pg_ctl_start(deadline):
                    break
                if fixed_port or "could not bind" not in _tail(self.log, 20):
                    raise self._failure("pg_ctl start failed")
            else:
                raise self._failure("pg_ctl start failed (no free port)")
            self.pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            self._wait_ready(deadline)
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _drop_stale_pid_file(self) -> None:
        """Remove the lock files of a postmaster that is dead, so a restart after kill() is quick.

        PID 1 here reaps orphans only after a second or two, and PostgreSQL (which probes the
        PID in its data-dir and socket lock files with ``kill(pid, 0)``) refuses to start while
        the killed postmaster is still a zombie.
        """
        for lock in [self.data_dir / "postmaster.pid", *self.socket_dir.glob(".s.PGSQL.*.lock")]:
            try:
                old_pid = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if self._runs_our_cluster(old_pid):
                raise RuntimeError(f"a postmaster (PID {old_pid}) still holds {lock}")
            lock.unlink()

    def _pg_ctl_start(self, deadline: float) -> bool:
        options = " ".join(
            [
                f"-h {shlex.quote(self.host)}",
                f"-p {self.port}",
                # pg_ctl runs the postmaster through /bin/sh: quote what could hold spaces.
                f"-k {shlex.quote(str(self.socket_dir))}",
                f"-c max_connections={self.max_connections}",
                "-c unix_socket_permissions=0700",
                "-c shared_buffers=32MB",
                "-c log_min_messages=warning",
                "-c log_connections=off",
                "-c log_disconnections=off",
            ]
        )
        seconds = max(1, int(deadline - time.monotonic()))
        # No -l: the postmaster inherits this descriptor (we can write the log in workdir; the
        # server user could not even open that path). pg_ctl puts the postmaster in its own
        # session, so its process group is the postmaster and every backend.
        with open(self.log, "ab") as log:
            env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
            env["LC_ALL"] = "C"
            result = subprocess.run(
                self._as_user(
                    [
                        self._bin("pg_ctl"),
                        "start",
                        "-w",
                        "-t",
                        str(seconds),
                        "-D",
                        str(self.data_dir),
                        "-o",
                        options,
                    ]
                ),
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                timeout=seconds + 10,
                check=False,
            )
        return result.returncode == 0

    def _wait_ready(self, deadline: float) -> None:
        while True:
            result = self._run(
                [
                    self._bin("pg_isready"),
                    "-q",
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-U",
                    SUPERUSER,
                    "-t",
                    "1",
                ],
                timeout=5,
                as_user=False,
            )
            if result.returncode == 0:
                return
            if self.pid is None or not _alive(self.pid):
                raise self._failure("PostgreSQL exited during startup")
            if time.monotonic() > deadline:
                raise self._failure("PostgreSQL did not accept connections in time")
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> None:
        """Stop the server (``pg_ctl stop -m fast``, then SIGKILL by PID); keeps the cluster."""
        pid = self.pid if self.pid is not None else self._orphan_postmaster()
        if pid is None:
            return
        if self._bindir is not None and self.run_dir is not None and _alive(pid):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._run(
                    [
                        self._bin("pg_ctl"),
                        "stop",
                        "-D",
                        str(self.data_dir),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        str(int(timeout)),
                    ],
                    timeout=timeout + 5,
                )
        self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends at once (a crash; the cluster stays)."""
        pid, self.pid = self.pid, None
        if pid is None:
            pid = self._orphan_postmaster()  # a start() that failed half-way
            if pid is None:
                return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        gone_by = time.monotonic() + 10
        while (_alive(pid) or _live_group_members(pid)) and time.monotonic() < gone_by:
            time.sleep(0.01)

    def _orphan_postmaster(self) -> int | None:
        """The PID in our ``postmaster.pid`` if that process runs our data directory."""
        if self.run_dir is None:
            return None
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if self._runs_our_cluster(pid) else None

    def _runs_our_cluster(self, pid: int) -> bool:
        """Whether ``pid`` is a live (non-zombie) postgres process on our data directory."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            return False
        return os.fsencode(str(self.data_dir)) in argv and _alive(pid)

    def close(self) -> None:
        """Stop the server and delete its cluster directory; idempotent."""
        atexit.unregister(self.close)
        try:
            self.stop()
        finally:
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                with contextlib.suppress(OSError):
                    (self.workdir / "cluster").unlink()
                self.run_dir = None
                self._initialized = False

    def __enter__(self) -> PostgresServer:
        if self.pid is None:
            self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -------------------------------------------------------------- databases
    def create_database(self, name: str) -> str:
        """Create database ``name`` (letters, digits, ``_``) and return its URL."""
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"bad database name {name!r}")
        result = self._run(
            [self._bin("createdb"), "-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "--", name],
            timeout=30,
            as_user=False,
        )
        self._check(f"createdb {name}", result)
        return self.url_for(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql (unaligned, tuples only) and return its output."""
        result = self._run(
            [
                self._bin("psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            timeout=60,
            as_user=False,
        )
        self._check("psql", result)
        return result.stdout


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs and is no zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


if __name__ == "__main__":  # manual check: python -m devstack.postgres
    with tempfile.TemporaryDirectory() as tmp, PostgresServer(Path(tmp)) as server:
        print(f"started in {server.startup_seconds:.2f} s: {server.url}", file=sys.stderr)
        print(server.psql("select version()"))
