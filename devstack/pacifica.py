"""Start the real Pacifica Archive Interface + Cartd stack on 127.0.0.1 for tests.

The services come from a separate virtualenv made by ``scripts/install-pacifica-stack.sh``
(``pacifica-cartd==0.7.0``, ``pacifica-archiveinterface==0.4.2``). Nothing here needs a
system server: Celery's broker is kombu's ``filesystem://`` transport (a directory in the
work dir), its transport options come from a Celery config module that this class writes
and points ``CELERY_CONFIG_MODULE`` at, and the result backend is ``cache+memory://``
(every Cartd task is ``ignore_result``).

Usage::

    with PacificaStack(tmp_path, venv, database_url=pg.create_database("cartd")) as stack:
        stack.put_file(34, b"data")
        requests.post(f"{stack.cartd_url}/{uid}", json={"fileids": [...]})

Cartd's database: PostgreSQL when ``database_url`` names one (``postgresql://...``, e.g. from
``devstack/postgres.py``), as Pacifica's own compose runs it; else a SQLite file in the work
dir. The tests, the demo and the benchmarks use PostgreSQL: on SQLite a burst of carts makes
the worker fail staging tasks with "database is locked" and leaves those carts ``staging`` for
ever. One Celery worker process either way: with two on PostgreSQL a bundled cart was once
served empty (Cartd 0.7.0's tasks each call ``prepare_bundle`` when they see every file
staged, so two processes can write the same bundle at once while the cart reads ``ready``).

Facts this relies on (0.7.0 / 0.4.2): both services read their config only from the
environment (``CARTD_CONFIG``, ``ARCHIVEINTERFACE_CONFIG``; their ``-c`` flags are
ignored); SQLite needs the ``sqlite:///`` peewee scheme and one Celery worker process
(more deadlock); the 0.4.2 archive shares one file handle between request threads, so it
runs with one thread; CherryPy limits request bodies to 100 MB unless told otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from typing import IO, Any, ClassVar, Self

HOST = "127.0.0.1"
POLL_INTERVAL = 0.05
_EXECUTABLES = ("pacifica-archiveinterface", "pacifica-cartd", "pacifica-cartd-cmd", "celery")
# Environment variables that would change what the services read instead of our files.
_SCRUBBED_ENV_PREFIXES = ("CELERY_", "CARTD_", "ARCHIVEINTERFACE_")
_SCRUBBED_ENV = {
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "BROKER_URL",
    "BACKEND_URL",
    "PEEWEE_URL",
    "VOLUME_PATH",
    "LRU_BUFFER_TIME",
    "LRU_PURGE",
    "BUNDLE_TASK",
    "TRANSFER_SIZE",
    "ARCHIVE_INTERFACE_URL",
    "DATABASE_DEBUG_LOGGING",
    "DATABASE_CONNECT_ATTEMPTS",
    "DATABASE_CONNECT_WAIT",
}
CELERY_CONFIG_MODULE = "pacifica_stack_celeryconfig"
# kombu 5.7's filesystem transport creates a message file and only then writes into it, while
# the consumer takes any file it sees: reading one still empty, the worker dies on a
# JSONDecodeError and every later cart stays "staging" (many carts at once hit it). The Celery
# config module, imported by Cartd and the worker alike, makes publishing write-then-rename.
_ATOMIC_BROKER_PUT = """

import os as _os
import time as _time
import uuid as _uuid

from kombu.transport import filesystem as _filesystem
from kombu.utils.json import dumps as _dumps


def _atomic_put(self, queue, payload, **kwargs):
    name = f"{round(_time.monotonic() * 1000)}_{_uuid.uuid4()}.{queue}.msg"
    final = _os.path.join(self.data_folder_out, name)
    partial = _os.path.join(self.data_folder_out, "." + name + ".part")
    with open(partial, "wb") as handle:
        handle.write(_dumps(payload).encode())
    _os.rename(partial, final)


_filesystem.Channel._put = _atomic_put
"""


def write_cherrypy_config(path: Path, threads: int) -> None:
    """A CherryPy config for a Pacifica REST service: MethodDispatcher, no autoreload."""
    path.write_text(
        "[global]\n"
        "log.screen = True\n"
        "engine.autoreload.on = False\n"
        "checker.on = False\n"
        f"server.thread_pool = {threads}\n"
        "server.socket_timeout = 60\n"
        "\n[/]\n"
        "request.dispatch = cherrypy.dispatch.MethodDispatcher()\n",
        encoding="utf-8",
    )


def write_celery_config(path: Path, broker_dir: Path, what: str) -> None:
    """A Celery config module: kombu's filesystem broker in ``broker_dir``, publishing atomically."""
    queue = str(broker_dir / "queue")
    options = {
        "data_folder_in": queue,
        "data_folder_out": queue,
        "control_folder": str(broker_dir / "control"),
        # Keep consumed messages out of the shared temp dir (and out of other stacks' way).
        "store_processed": True,
        "processed_folder": str(broker_dir / "processed"),
        # The virtual transport sleeps this long whenever its queues are empty (default 1 s).
        "polling_interval": POLL_INTERVAL,
    }
    path.write_text(
        f'"""Celery settings for {what} (written by devstack)."""\n'
        f"broker_transport_options = {options!r}\n"
        "broker_connection_retry_on_startup = True\n"
        "worker_hijack_root_logger = True\n" + _ATOMIC_BROKER_PUT,
        encoding="utf-8",
    )


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ini_value(value: object) -> str:
    """A value for a ConfigParser file (``%`` would start an interpolation)."""
    return str(value).replace("%", "%%")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _live_group_members(pgid: int) -> list[int]:
    """PIDs in process group ``pgid`` that are not zombies (Linux ``/proc``)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


class _Process:
    """One service process, in its own session (so its whole group can be stopped)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.name = name
        self.argv = argv
        self.log = log
        self.finished = False
        # A fresh log each time: the worker's readiness is read from it.
        self._logfile: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed in finish()
        try:
            self.popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            self._logfile.close()
            raise
        self.pgid = self.popen.pid  # start_new_session: the child leads its own group

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def terminate(self) -> None:
        """SIGTERM the whole process group (a no-op once the leader has been reaped)."""
        if not self.finished and self.alive():
            self._signal_group(signal.SIGTERM)

    def finish(self, deadline: float) -> None:
        """Wait for the leader until ``deadline``, then SIGKILL whatever is left of the group."""
        if self.finished:  # never signal a process group id that may have been reused since
            return
        self.finished = True
        if self.alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(max(0.0, deadline - time.monotonic()))
        # Children (celery's pool process) may outlive the leader: kill the group too.
        self._signal_group(signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.wait(5)
        # Wait until nothing of the group runs any more. Orphaned children stay zombies until
        # init reaps them (a second or two here), which costs nothing, so they do not count.
        gone_by = time.monotonic() + 5
        while _live_group_members(self.pgid) and time.monotonic() < gone_by:
            time.sleep(0.01)
        self._logfile.close()


class _ProcessStack:
    """The process lifecycle both stacks share: spawn, wait for, and stop their processes.

    Every process comes from one virtualenv, runs in its own process group and gets the same
    scrubbed environment. A subclass sets the class attributes below and supplies ``start`` and
    ``_service_env``.
    """

    #: Seconds the Celery worker gets after SIGTERM before SIGKILL. Its warm (and even cold)
    #: shutdown takes 2.5-5 s with a polling transport (its loop checks for shutdown every
    #: 2 s); the broker is a throw-away directory, so nothing is lost by not waiting.
    WORKER_GRACE = 0.3

    #: In "<label> <process> exited during startup".
    _label: ClassVar[str]
    #: In "<stack label> did not come up in time".
    _stack_label: ClassVar[str]
    #: Environment variables (by name, and by prefix) that would change what the services read
    #: instead of our files.
    _scrubbed_env: ClassVar[set[str]]
    _scrubbed_env_prefixes: ClassVar[tuple[str, ...]]
    #: The module (in :attr:`config_dir`) that ``CELERY_CONFIG_MODULE`` names.
    _celery_config_module: ClassVar[str]

    def __init__(self, workdir: Path, venv: Path, host: str = HOST):
        self.workdir = Path(workdir).resolve()
        self.venv = Path(venv).resolve()
        self.host = host
        self.startup_seconds: float | None = None
        self._procs: dict[str, _Process] = {}
        self._started = False

    def start(self, timeout: float = 60) -> Self:
        raise NotImplementedError

    # ------------------------------------------------------------------ paths
    def _bin(self, name: str) -> Path:
        return self.venv / "bin" / name

    @property
    def broker_dir(self) -> Path:
        return self.workdir / "broker"

    @property
    def config_dir(self) -> Path:
        return self.workdir / "config"

    @property
    def logs(self) -> dict[str, Path]:
        """Log file of each process, by name (``dbsync``, ``worker`` and the stack's services)."""
        return {name: proc.log for name, proc in self._procs.items()}

    def _require_installed(self, executables: tuple[str, ...], what: str) -> None:
        """RuntimeError naming every one of ``executables`` missing from the virtualenv."""
        missing = [str(self._bin(exe)) for exe in executables if not os.access(self._bin(exe), os.X_OK)]
        if missing:
            raise RuntimeError(
                f"{what} not installed (run scripts/install-pacifica-stack.sh): missing " + ", ".join(missing)
            )

    # ------------------------------------------------------------ environment
    def _service_env(self) -> dict[str, str]:
        """The stack's own variables (its config files, URLs), set after ``PYTHONPATH``."""
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in self._scrubbed_env and not key.startswith(self._scrubbed_env_prefixes)
        }
        env.update(
            {
                "PATH": f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}",
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(self.config_dir),
            }
        )
        env.update(self._service_env())
        env.update(
            {
                "CELERY_CONFIG_MODULE": self._celery_config_module,
                # The worker leaves pymp-* directories in the temp dir when it is killed.
                "TMPDIR": str(self.workdir / "tmp"),
            }
        )
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        # The workers talk HTTP (to the archive, the Policy, targets) with requests: never
        # through a proxy.
        for key in ("NO_PROXY", "no_proxy"):
            env[key] = ",".join(filter(None, [env.get(key, ""), "127.0.0.1", "localhost"]))
        return env

    # -------------------------------------------------------------- lifecycle
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> _Process:
        proc = _Process(name, argv, env, self.workdir, self.workdir / f"{name}.log")
        self._procs[name] = proc
        return proc

    def _failure(self, message: str) -> RuntimeError:
        parts = [message]
        for name, proc in self._procs.items():
            state = "running" if proc.alive() else f"exited {proc.popen.returncode}"
            parts.append(f"--- {name} ({state}) {proc.log} ---\n{_tail(proc.log)}")
        return RuntimeError("\n".join(parts))

    def _wait_all(
        self, checks: dict[str, Callable[[], bool]], deadline: float, may_exit: bool = False
    ) -> None:
        pending = dict(checks)
        while pending:
            for name, check in list(pending.items()):
                if check():
                    del pending[name]
                elif not may_exit and not self._procs[name].alive():
                    raise self._failure(f"{self._label} {name} exited during startup")
            if not pending:
                return
            if time.monotonic() > deadline:
                raise self._failure(
                    f"{self._stack_label} did not come up in time; waiting for " + ", ".join(pending)
                )
            time.sleep(POLL_INTERVAL)

    def _worker_ready(self) -> bool:
        log = self._procs["worker"].log
        try:
            with open(log, "rb") as handle:
                return b" ready." in handle.read()
        except OSError:
            return False

    def _stop_helpers(self) -> None:
        """Stop what runs in this process (after the processes, before ``_started`` is reset)."""

    def stop(self, timeout: float = 10) -> None:
        """Stop every started process (and its children) by process group; idempotent.

        All groups get SIGTERM at once; each leader then has until ``timeout`` (the Celery
        worker only ``WORKER_GRACE``) before its group gets SIGKILL. What the stack runs in this
        process (NotificationsStack's Policy stand-in) stops after that.
        """
        atexit.unregister(self.stop)
        procs = list(self._procs.values())
        for proc in procs:
            proc.terminate()
        now = time.monotonic()
        errors = []
        for proc in procs:
            grace = min(timeout, self.WORKER_GRACE) if proc.name == "worker" else timeout
            try:
                proc.finish(now + grace)
            except Exception as exc:  # keep stopping the others
                errors.append(f"{proc.name}: {exc!r}")
        self._stop_helpers()
        self._started = False
        if errors:
            print(f"{type(self).__name__}.stop: " + "; ".join(errors), file=sys.stderr)

    def __enter__(self) -> Self:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


class PacificaStack(_ProcessStack):
    """Archive Interface, Cartd (+ dbsync) and one Celery worker, each on a free local port.

    ``archive_port`` and ``cartd_port`` fix the ports instead (upstream's tests hard-code
    8080 and 8081; they run in a network namespace of their own, where those are free).
    ``database_url`` is Cartd's PostgreSQL database (None: a SQLite file), ``worker_processes``
    the Celery worker's concurrency (1; more only on PostgreSQL, and bundled carts then race).
    """

    _label = "Pacifica"
    _stack_label = "Pacifica stack"
    _scrubbed_env = _SCRUBBED_ENV
    _scrubbed_env_prefixes = _SCRUBBED_ENV_PREFIXES
    _celery_config_module = CELERY_CONFIG_MODULE

    def __init__(
        self,
        workdir: Path,
        venv: Path,
        host: str = HOST,
        archive_port: int = 0,
        cartd_port: int = 0,
        database_url: str | None = None,
        worker_processes: int | None = None,
    ):
        super().__init__(workdir, venv, host)
        self.archive_port = archive_port
        self.cartd_port = cartd_port
        self.database_url = database_url
        if database_url is None and (worker_processes or 1) > 1:
            raise ValueError("Cartd on SQLite takes one Celery worker process (more deadlock)")
        self.worker_processes = worker_processes or 1
        self.archive_url = ""
        self.cartd_url = ""

    # ------------------------------------------------------------------ paths
    @property
    def archive_dir(self) -> Path:
        return self.workdir / "archive"

    @property
    def cart_volume(self) -> Path:
        return self.workdir / "cartd-volume"

    # ----------------------------------------------------------------- config
    def _write_configs(self) -> None:
        # Messages left by an earlier run in the same work dir must not be replayed.
        shutil.rmtree(self.broker_dir, ignore_errors=True)
        for folder in (
            self.archive_dir,
            self.cart_volume,
            self.config_dir,
            self.broker_dir / "queue",
            self.broker_dir / "control",
            self.broker_dir / "processed",
        ):
            folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config_dir

        (cfg / "archiveinterface.ini").write_text("[posix]\nuse_id2filename = false\n", encoding="utf-8")
        (cfg / "archive-cherrypy.ini").write_text(
            "[global]\n"
            "log.screen = True\n"
            "engine.autoreload.on = False\n"
            "checker.on = False\n"
            # 0.4.2 keeps one open file per backend object: one thread, or GETs interleave.
            "server.thread_pool = 1\n"
            "server.max_request_body_size = 0\n"
            "server.socket_timeout = 60\n"
            "\n[/]\n"
            "request.dispatch = cherrypy.dispatch.MethodDispatcher()\n",
            encoding="utf-8",
        )
        peewee_url = self.database_url or f"sqlite:///{self.workdir / 'cartd.sqlite3'}?timeout=30"
        (cfg / "cartd.ini").write_text(
            "[cartd]\n"
            "transfer_size = 1 Mb\n"
            f"volume_path = {_ini_value(self.cart_volume)}/\n"
            # Never purge carts while a test runs (purging only happens when disk is short).
            "lru_buffer_time = 315360000\n"
            "lru_purge = off\n"
            "bundle_task = off\n"
            "\n[database]\n"
            f"peewee_url = {_ini_value(peewee_url)}\n"
            "debug_logging = False\n"
            "connect_attempts = 10\n"
            "connect_wait = 1\n"
            "\n[archiveinterface]\n"
            f"url = {_ini_value(self.archive_url)}/\n"
            "\n[celery]\n"
            "broker_url = filesystem://\n"
            "backend_url = cache+memory://\n",
            encoding="utf-8",
        )
        write_cherrypy_config(cfg / "cartd-cherrypy.ini", threads=8)
        write_celery_config(cfg / f"{CELERY_CONFIG_MODULE}.py", self.broker_dir, "the Pacifica Cartd stack")

    def _service_env(self) -> dict[str, str]:
        cfg = self.config_dir
        return {
            "ARCHIVEINTERFACE_CONFIG": str(cfg / "archiveinterface.ini"),
            "ARCHIVEINTERFACE_CPCONFIG": str(cfg / "archive-cherrypy.ini"),
            "CARTD_CONFIG": str(cfg / "cartd.ini"),
            "CARTD_CPCONFIG": str(cfg / "cartd-cherrypy.ini"),
        }

    # -------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60) -> PacificaStack:
        """Start every service and wait until each answers; RuntimeError (with logs) if not."""
        if self._started:
            raise RuntimeError("PacificaStack already started")
        self._require_installed(_EXECUTABLES, "Pacifica stack")
        began = time.monotonic()
        deadline = began + timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.archive_port = self.archive_port or free_port(self.host)
        self.cartd_port = self.cartd_port or free_port(self.host)
        while self.cartd_port == self.archive_port:
            self.cartd_port = free_port(self.host)
        self.archive_url = f"http://{self.host}:{self.archive_port}"
        self.cartd_url = f"http://{self.host}:{self.cartd_port}"
        self._write_configs()
        env = self._env()
        self._started = True
        atexit.register(self.stop)
        try:
            self._spawn(
                "archive",
                [
                    str(self._bin("pacifica-archiveinterface")),
                    "-a",
                    self.host,
                    "-p",
                    str(self.archive_port),
                    "-t",
                    "posix",
                    "--prefix",
                    str(self.archive_dir),
                    "--cherrypy-config",
                    str(self.config_dir / "archive-cherrypy.ini"),
                ],
                env,
            )
            dbsync = self._spawn("dbsync", [str(self._bin("pacifica-cartd-cmd")), "dbsync"], env)
            self._spawn(
                "worker",
                [
                    str(self._bin("celery")),
                    "-A",
                    "pacifica.cartd.tasks:CART_APP",
                    "worker",
                    "--concurrency",
                    str(self.worker_processes),
                    "--pool",
                    "prefork",
                    "--loglevel",
                    "INFO",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--hostname",
                    f"pacifica-stack-{self.cartd_port}@{self.host}",
                ],
                env,
            )

            self._wait_for("dbsync", lambda: not dbsync.alive(), deadline, may_exit=True)
            if dbsync.popen.returncode != 0:
                raise self._failure(f"pacifica-cartd-cmd dbsync failed (exit {dbsync.popen.returncode})")
            self._spawn(
                "cartd",
                [
                    str(self._bin("pacifica-cartd")),
                    "-a",
                    self.host,
                    "-p",
                    str(self.cartd_port),
                    "--cpconfig",
                    str(self.config_dir / "cartd-cherrypy.ini"),
                ],
                env,
            )

            checks: dict[str, Callable[[], bool]] = {
                "archive": lambda: self._answers(self.archive_port),
                "worker": self._worker_ready,
                "cartd": lambda: self._answers(self.cartd_port),
            }
            self._wait_all(checks, deadline)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _wait_for(
        self, name: str, check: Callable[[], bool], deadline: float, may_exit: bool = False
    ) -> None:
        self._wait_all({name: check}, deadline, may_exit=may_exit)

    def _answers(self, port: int) -> bool:
        """Whether the service on ``port`` answers ``GET /`` with 200."""
        conn = http.client.HTTPConnection(self.host, port, timeout=2)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop_cartd(self, timeout: float = 10) -> None:
        """Stop only the Cartd REST server (the archive and the Celery worker keep running).

        Its port stays reserved for :meth:`start_cartd`, which brings it back on the same URL.
        """
        proc = self._procs.get("cartd")
        if proc is None or not self._started:
            raise RuntimeError("PacificaStack is not running: no Cartd to stop")
        proc.terminate()
        proc.finish(time.monotonic() + timeout)
        deadline = time.monotonic() + timeout
        while self._answers(self.cartd_port):
            if time.monotonic() > deadline:
                raise self._failure(f"Cartd still answers on port {self.cartd_port} after it was stopped")
            time.sleep(POLL_INTERVAL)

    def start_cartd(self, timeout: float = 30) -> None:
        """Start the Cartd REST server again on its port (a no-op while it runs)."""
        old = self._procs.get("cartd")
        if old is None or not self._started:
            raise RuntimeError("PacificaStack is not running: start() it first")
        if not old.finished and old.alive():
            return
        # Keep the log of the stopped run beside the new one.
        with contextlib.suppress(OSError):
            old.log.replace(old.log.with_name(f"cartd-{time.time_ns()}.log"))
        deadline = time.monotonic() + timeout
        self._spawn("cartd", old.argv, self._env())
        self._wait_for("cartd", lambda: self._answers(self.cartd_port), deadline)

    # ------------------------------------------------------------------ files
    def _put(self, file_id: int | str, body: Any, length: int, mtime: float | None) -> None:
        path = "/" + urllib.parse.quote(str(file_id).lstrip("/"))
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(length),
            "Last-Modified": formatdate(mtime if mtime is not None else time.time(), usegmt=True),
            "Connection": "close",
        }
        conn = http.client.HTTPConnection(self.host, self.archive_port, timeout=120, blocksize=1 << 20)
        try:
            conn.request("PUT", path, body=body, headers=headers)
            resp = conn.getresponse()
            text = resp.read()
        finally:
            conn.close()
        if resp.status != 201:
            raise RuntimeError(f"archive PUT {path} answered {resp.status}: {text[:500]!r}")

    def put_file(self, file_id: int | str, data: bytes) -> None:
        """Store ``data`` as file ``file_id`` in the archive (PUT /<id>, expects 201).

        The archive (0.4.2) needs ``Content-Length``; it ignores ``Last-Modified`` (it looks
        for a WSGI-style key CherryPy never gives it), so a file's mtime is the time of the PUT.
        Stored files are made read-only: overwriting an id works only when running as root.
        """
        self._put(file_id, bytes(data), len(data), None)

    def put_file_from_path(self, file_id: int | str, path: str | os.PathLike[str]) -> None:
        """Stream a file from disk into the archive without reading it into memory."""
        path = Path(path)
        with open(path, "rb") as handle:
            self._put(file_id, handle, os.fstat(handle.fileno()).st_size, path.stat().st_mtime)

    def archive_path(self, file_id: int | str) -> Path:
        """Where the posix archive keeps ``file_id`` (for tests that tamper with it)."""
        return self.archive_dir / str(file_id).lstrip("/")
