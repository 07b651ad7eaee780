"""The webhook service's configuration: a frozen value with named defaults, read from the environment."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, get_type_hints

from ..cartapi import (
    DEFAULT_CART_API_URL,
    DEFAULT_CART_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
)
from ..downloader import DEFAULT_BUNDLE_THRESHOLD, DEFAULT_TIMEOUT_PER_FILE, DEFAULT_TIMEOUT_RATE
from ..tls import check_ca_bundle, check_client_cert, tls_options
from .jsonpath import compile_jsonpath
from .layout import DEFAULT_LAYOUT, check_layout

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8080
DEFAULT_EVENT_TYPES: Final = ("org.pacifica.metadata.ingest",)
DEFAULT_MAX_BODY_BYTES: Final = 10 * 1024 * 1024
DEFAULT_WORKERS: Final = 4
DEFAULT_HTTP_THREADS: Final = 32
DEFAULT_REQUEST_TIMEOUT: Final = 30.0
DEFAULT_IDLE_TIMEOUT: Final = 10.0
DEFAULT_RETRY_AFTER: Final = 5
DEFAULT_ALLOWED_ORIGINS: Final = ("*",)
DEFAULT_FILENAME: Final = "data"
DEFAULT_SYNC_WAIT: Final = 30.0
DEFAULT_LEASE_SECONDS: Final = 60.0
DEFAULT_POLL_INTERVAL: Final = 0.5
# Docker's and Compose's default stop timeout is 10 s (Kubernetes' 30 s): the grace, the
# 2 s a stuck read may take to notice, and the exit fit inside it. Raise it together with
# the orchestrator's (stop_grace_period, terminationGracePeriodSeconds) for long transfers.
DEFAULT_SHUTDOWN_GRACE: Final = 6.0
DEFAULT_MIN_FREE_BYTES: Final = 100 * 1024 * 1024
# Retries: 5 s, 10 s, 20 s, ... at most 15 min apart, for a day; then the job is a dead letter.
DEFAULT_RETRY_BASE: Final = 5.0
DEFAULT_RETRY_MAX_DELAY: Final = 900.0
DEFAULT_RETRY_WINDOW: Final = 86400.0
# The rule compose's subscription always used: every ingest event (Notifications' own example).
DEFAULT_SUBSCRIPTION_JSONPATH: Final = '$[?(@["eventType"] = "org.pacifica.metadata.ingest")]'
DEFAULT_SUBSCRIPTION_NAME: Final = "pacifica downloader"
DEFAULT_SUBSCRIPTION_CHECK: Final = 30.0
DEFAULT_USER_HEADER: Final = "Http-Remote-User"
STATE_DIR_NAME: Final = "pacifica-downloader"
DATABASE_FILE: Final = "jobs.sqlite3"


def setting(default: Any, env: str, help: str) -> Any:
    """A field of :class:`Settings`: its default, its environment variable and what it means.

    Parsing and validation come from the field's type and ``_RANGES`` (``__post_init__``),
    so a ``Settings(...)`` built in code is checked as one read from the environment is.
    """
    return field(default=default, metadata={"env": env, "help": help})


@dataclass(frozen=True)
class Settings:
    """Everything the service can be told. Field metadata names the environment variable."""

    host: str = setting(DEFAULT_HOST, "DOWNLOADER_HOST", "address to listen on")
    port: int = setting(DEFAULT_PORT, "DOWNLOADER_PORT", "port to listen on")
    cartd_url: str = setting(DEFAULT_CART_API_URL, "CARTD_URL", "Cartd's cart API URL")
    state_dir: str = setting(
        "",
        "DOWNLOADER_STATE_DIR",
        "where the job database and downloads live (default: $STATE_DIRECTORY, else "
        "$XDG_STATE_HOME/pacifica-downloader, else ~/.local/state/pacifica-downloader)",
    )
    download_root: str = setting(
        "",
        "DOWNLOADER_ROOT",
        "where per-event download directories are made (default: <state dir>/downloads)",
    )
    database_url: str = setting(
        "",
        "DOWNLOADER_DATABASE_URL",
        "the job store: postgresql://user:pw@host/db, or sqlite:///path "
        "(default: SQLite <state dir>/jobs.sqlite3)",
    )
    db_upgrade: bool = setting(
        True, "DOWNLOADER_DB_UPGRADE", "bring the job store's schema up to date at start (else only check it)"
    )
    event_types: tuple[str, ...] = setting(
        DEFAULT_EVENT_TYPES, "DOWNLOADER_EVENT_TYPES", "comma-separated event types accepted"
    )
    strict: bool = setting(
        False,
        "DOWNLOADER_STRICT",
        "answer events that can never be downloaded 4xx, and final failures with their "
        "error status (default: record them as rejected/failed jobs and answer 2xx)",
    )
    token: str = setting(
        "", "DOWNLOADER_TOKEN", "bearer token the sender (Notifications) must send on POST / (empty: none)"
    )
    basic_auth: str = setting(
        "",
        "DOWNLOADER_BASIC_AUTH",
        "user:password the sender must send as HTTP basic auth on POST / (empty: none)",
    )
    admin_token: str = setting(
        "",
        "DOWNLOADER_ADMIN_TOKEN",
        "bearer token of operators: /jobs, retry, delete, the jobs page (none set: "
        "those answer only this host)",
    )
    admin_basic_auth: str = setting(
        "",
        "DOWNLOADER_ADMIN_BASIC_AUTH",
        "user:password of operators, as HTTP basic auth (the jobs page in a browser)",
    )
    max_body_bytes: int = setting(
        DEFAULT_MAX_BODY_BYTES, "DOWNLOADER_MAX_BODY_BYTES", "largest request body accepted (413 above)"
    )
    workers: int = setting(
        DEFAULT_WORKERS, "DOWNLOADER_WORKERS", "downloads run at once by this process (0: intake only)"
    )
    http_threads: int = setting(DEFAULT_HTTP_THREADS, "DOWNLOADER_HTTP_THREADS", "requests served at once")
    request_timeout: float = setting(
        DEFAULT_REQUEST_TIMEOUT,
        "DOWNLOADER_REQUEST_TIMEOUT",
        "seconds a client has to send a whole request, head and body, from its first byte (408 after)",
    )
    idle_timeout: float = setting(
        DEFAULT_IDLE_TIMEOUT,
        "DOWNLOADER_IDLE_TIMEOUT",
        "seconds a connection may stay silent: before its request, within it, or kept alive",
    )
    max_queued: int = setting(
        0, "DOWNLOADER_MAX_QUEUED", "queued jobs before new events get 429 (0: no cap, the disk is the limit)"
    )
    respond_async: bool = setting(
        False, "DOWNLOADER_ASYNC", "answer every POST 202 + status_url (else only with Prefer: respond-async)"
    )
    sync_wait: float = setting(
        DEFAULT_SYNC_WAIT,
        "DOWNLOADER_SYNC_WAIT",
        "seconds a synchronous POST waits for its download before answering 202",
    )
    retry_after: int = setting(
        DEFAULT_RETRY_AFTER, "DOWNLOADER_RETRY_AFTER", "Retry-After seconds on 429 and 503"
    )
    retry_base: float = setting(
        DEFAULT_RETRY_BASE, "DOWNLOADER_RETRY_BASE", "seconds before the first retry of a failed download"
    )
    retry_max_delay: float = setting(
        DEFAULT_RETRY_MAX_DELAY, "DOWNLOADER_RETRY_MAX_DELAY", "longest pause between two retries"
    )
    retry_window: float = setting(
        DEFAULT_RETRY_WINDOW,
        "DOWNLOADER_RETRY_WINDOW",
        "seconds after its arrival that a job is retried before it fails for good",
    )
    lease_seconds: float = setting(
        DEFAULT_LEASE_SECONDS,
        "DOWNLOADER_LEASE_SECONDS",
        "a running job's lease; a job whose worker died is taken over when it runs out",
    )
    shutdown_grace: float = setting(
        DEFAULT_SHUTDOWN_GRACE,
        "DOWNLOADER_SHUTDOWN_GRACE",
        "seconds running downloads may finish after SIGTERM before they are handed back",
    )
    poll_interval: float = setting(
        DEFAULT_POLL_INTERVAL, "DOWNLOADER_POLL_INTERVAL", "seconds an idle worker waits between looks"
    )
    retention: float = setting(
        0.0,
        "DOWNLOADER_RETENTION",
        "seconds a finished job's download is kept before it is removed (0: for ever)",
    )
    allowed_origins: tuple[str, ...] = setting(
        DEFAULT_ALLOWED_ORIGINS,
        "DOWNLOADER_ALLOWED_ORIGINS",
        "webhook origins allowed (comma-separated, * = all)",
    )
    event_sink: str = setting(
        "",
        "DOWNLOADER_EVENT_SINK",
        "where a CloudEvent goes when a job ends (empty: $K_SINK, the Knative convention; else none)",
    )
    public_url: str = setting(
        "",
        "DOWNLOADER_PUBLIC_URL",
        "the service's URL as clients reach it, for status_url and Location "
        "(empty: from the request, which a sender's Host header decides)",
    )
    notifications_url: str = setting(
        "",
        "DOWNLOADER_NOTIFICATIONS_URL",
        "Pacifica Notifications' REST base (e.g. http://notifications:8070): `serve` then "
        "owns its subscription, re-enables it and records gaps (empty: no subscription guard)",
    )
    notifications_user: str = setting(
        "",
        "DOWNLOADER_NOTIFICATIONS_USER",
        "the Notifications user who owns the subscription (needed with DOWNLOADER_NOTIFICATIONS_URL)",
    )
    notifications_user_header: str = setting(
        DEFAULT_USER_HEADER,
        "DOWNLOADER_NOTIFICATIONS_USER_HEADER",
        "the header Notifications reads its user from (its user_header setting)",
    )
    subscription_jsonpath: str = setting(
        DEFAULT_SUBSCRIPTION_JSONPATH,
        "DOWNLOADER_SUBSCRIPTION_JSONPATH",
        "the subscription's JSONPath rule: which events Notifications routes here",
    )
    subscription_name: str = setting(
        DEFAULT_SUBSCRIPTION_NAME, "DOWNLOADER_SUBSCRIPTION_NAME", "the subscription's name"
    )
    subscription_check: float = setting(
        DEFAULT_SUBSCRIPTION_CHECK,
        "DOWNLOADER_SUBSCRIPTION_CHECK",
        "seconds between two checks of the subscription by `serve`",
    )
    layout: str = setting(
        DEFAULT_LAYOUT,
        "DOWNLOADER_LAYOUT",
        "each download's directory under the root, from {event_id} {source} {job} "
        "{transaction} {proposal} {instrument} {submitter} {date}; / makes subdirectories",
    )
    umask: str = setting(
        "022",
        "DOWNLOADER_UMASK",
        "octal umask of finished downloads (022: others may read, 027: the group only)",
    )
    filename: str = setting(
        DEFAULT_FILENAME, "DOWNLOADER_FILENAME", "directory inside download_path holding the files"
    )
    cart_timeout: float = setting(
        DEFAULT_CART_TIMEOUT,
        "DOWNLOADER_CART_TIMEOUT",
        "seconds to wait for Cartd to stage a cart, before the allowances per file and byte",
    )
    cart_timeout_per_file: float = setting(
        DEFAULT_TIMEOUT_PER_FILE,
        "DOWNLOADER_CART_TIMEOUT_PER_FILE",
        "seconds added to the staging wait for each file of the cart",
    )
    cart_timeout_rate: float = setting(
        DEFAULT_TIMEOUT_RATE,
        "DOWNLOADER_CART_TIMEOUT_RATE",
        "bytes a second of the files' size added to the staging wait (0: none)",
    )
    bundle: str = setting(
        "auto",
        "DOWNLOADER_BUNDLE",
        "ask Cartd for bundled carts (served as a file, resumable): auto (from "
        "DOWNLOADER_BUNDLE_THRESHOLD bytes), true or false",
    )
    bundle_threshold: int = setting(
        DEFAULT_BUNDLE_THRESHOLD,
        "DOWNLOADER_BUNDLE_THRESHOLD",
        "total size of an event's files from which auto asks for a bundle",
    )
    connect_timeout: float = setting(
        DEFAULT_CONNECT_TIMEOUT, "CARTD_CONNECT_TIMEOUT", "seconds to connect to Cartd"
    )
    read_timeout: float = setting(
        DEFAULT_READ_TIMEOUT, "CARTD_READ_TIMEOUT", "seconds Cartd may stay silent mid-answer"
    )
    ca_bundle: str = setting(
        "",
        "DOWNLOADER_CA_BUNDLE",
        "CA file (or c_rehash directory) trusted for https:// Cartd and Policy instead of the "
        "system's (empty: the system's)",
    )
    client_cert: str = setting(
        "",
        "DOWNLOADER_CLIENT_CERT",
        "PEM client certificate sent to Cartd and Policy (mutual TLS); with its key unless "
        "DOWNLOADER_CLIENT_KEY names the key's file",
    )
    client_key: str = setting(
        "", "DOWNLOADER_CLIENT_KEY", "the unencrypted PEM key of DOWNLOADER_CLIENT_CERT"
    )
    health_port: int = setting(
        0, "DOWNLOADER_HEALTH_PORT", "port of `worker`'s /health/live, /health/ready and /metrics (0: none)"
    )
    min_free_bytes: int = setting(
        DEFAULT_MIN_FREE_BYTES,
        "DOWNLOADER_MIN_FREE_BYTES",
        "free bytes under the download root below which /health/ready fails",
    )
    log_level: str = setting("INFO", "DOWNLOADER_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR")

    def __post_init__(self) -> None:
        # Checked here, so a Settings built in code is held to the same ranges as the environment.
        _check(self)

    def request_options(self) -> dict[str, Any]:
        """``requests`` keyword arguments for every call to Cartd and Policy (``verify``, ``cert``)."""
        return tls_options(self.ca_bundle or None, self.client_cert or None, self.client_key or None)

    def bundle_choice(self) -> bool | str:
        """``bundle`` as the library takes it: ``"auto"``, ``True`` or ``False``."""
        return "auto" if self.bundle == "auto" else self.bundle == "true"

    def umask_bits(self) -> int:
        """``umask`` as a number."""
        return int(self.umask, 8)

    def state(self) -> str:
        """The state directory, resolving the default at call time (it follows the environment)."""
        return self.state_dir or default_state_dir()

    def root(self) -> str:
        """The download root: ``DOWNLOADER_ROOT``, else ``downloads`` in the state directory."""
        return self.download_root or os.path.join(self.state(), "downloads")

    def target_url(self) -> str:
        """Where Notifications posts our events: ``DOWNLOADER_PUBLIC_URL`` with a trailing ``/``."""
        return self.public_url.rstrip("/") + "/"

    def database(self) -> str:
        """The job store's URL: ``DOWNLOADER_DATABASE_URL``, else SQLite in the state directory."""
        return self.database_url or "sqlite:///" + os.path.join(self.state(), DATABASE_FILE)


def default_state_dir(environ: Mapping[str, str] | None = None) -> str:
    """Where state survives reboots: systemd's ``$STATE_DIRECTORY``, else the XDG state home.

    Never the temp dir: a job store there would forget accepted events at the next reboot.
    """
    environ = os.environ if environ is None else environ
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return systemd
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, STATE_DIR_NAME)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


# Parsers by the field's type (the type itself, not the text of its annotation).
_PARSERS: dict[Any, Callable[[str], Any]] = {
    int: int,
    float: _float,
    bool: _bool,
    str: str,
    tuple[str, ...]: _names,
}
# Settings whose value is a secret: each may come from a file instead, ``<VARIABLE>_FILE``
# (the container convention: Docker and Kubernetes secrets are files).
SECRETS: Final = ("token", "basic_auth", "admin_token", "admin_basic_auth", "database_url")


def settings_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read every setting from ``environ`` (default ``os.environ``); ``overrides`` win.

    A malformed or out-of-range value raises ``ValueError`` naming the variable, and so does a
    ``DOWNLOADER_*`` variable that is no setting (a typo must not leave, say, auth off).
    """
    environ = os.environ if environ is None else environ
    specs = fields(Settings)
    types = get_type_hints(Settings)
    known = {spec.metadata["env"] for spec in specs} | {_env_name(name) + "_FILE" for name in SECRETS}
    unknown = sorted(name for name in environ if name.startswith("DOWNLOADER_") and name not in known)
    if unknown:
        raise ValueError(f"{unknown[0]} is not a setting of this service (a typo?); --help lists them")
    values: dict[str, Any] = {}
    for spec in specs:
        name = spec.metadata["env"]
        text = _secret_file(environ, name) if spec.name in SECRETS else None
        if text is None and name in environ:
            text = environ[name]
        if text is not None:
            try:
                values[spec.name] = _PARSERS[types[spec.name]](text)
            except ValueError as exc:
                shown = "[REDACTED]" if spec.name in SECRETS else repr(text)
                raise ValueError(f"{name}={shown}: {exc}") from None
    if "event_sink" not in values and environ.get("K_SINK"):
        values["event_sink"] = environ["K_SINK"]  # Knative's SinkBinding sets K_SINK
    values.update({key: value for key, value in overrides.items() if value is not None})
    return Settings(**values)


def _secret_file(environ: Mapping[str, str], name: str) -> str | None:
    """The content of ``<name>_FILE`` (one trailing newline dropped), or None when it is unset."""
    path = environ.get(name + "_FILE")
    if path is None:
        return None
    if name in environ:
        raise ValueError(f"set {name} or {name}_FILE, not both")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ValueError(f"{name}_FILE={path!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{name}_FILE={path!r} is not UTF-8 text") from None
    return text[:-1] if text.endswith("\n") else text


def _env_name(field_name: str) -> str:
    return str(Settings.__dataclass_fields__[field_name].metadata["env"])


def _refuse(field_name: str, accepts: str, value: Any) -> ValueError:
    shown = "[REDACTED]" if field_name in SECRETS else repr(value)
    return ValueError(f"{_env_name(field_name)} must be {accepts}, not {shown}")


# Numbers: (lowest, highest or None); every float must also be finite.
_RANGES: Final[dict[str, tuple[float, float | None]]] = {
    "port": (1, 65535),
    "health_port": (0, 65535),
    "max_body_bytes": (1, None),
    "http_threads": (1, 1024),
    "workers": (0, 1024),
    "max_queued": (0, None),
    "retry_after": (0, 86400),
    "min_free_bytes": (0, None),
    "bundle_threshold": (0, None),
    "sync_wait": (0, 3600),
    "retention": (0, None),
    "retry_base": (0, None),
    "retry_window": (0, None),
    "shutdown_grace": (0, 3600),
    "cart_timeout": (0.001, None),
    "cart_timeout_per_file": (0, None),
    "cart_timeout_rate": (0, None),
    "connect_timeout": (0.001, None),
    "read_timeout": (0.001, None),
    "request_timeout": (0.001, None),
    "idle_timeout": (0.001, None),
    "lease_seconds": (1, None),
    "poll_interval": (0.001, None),
    "subscription_check": (0.001, None),
}
_DATABASE_SCHEMES: Final = ("sqlite", "postgres", "postgresql", "postgresql+psycopg")
_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


def _check(settings: Settings) -> None:
    """Refuse a value out of its range, in one line naming its variable and what it takes."""
    for name, kind in get_type_hints(Settings).items():
        value = getattr(settings, name)
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _refuse(name, "a number", value)
        if kind is float and not math.isfinite(value):
            raise _refuse(name, "a finite number", value)
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise _refuse(name, "a whole number", value)
    for name, (low, high) in _RANGES.items():
        value = getattr(settings, name)
        if value < low or (high is not None and value > high):
            accepts = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
            raise _refuse(name, accepts, value)
    if settings.retry_max_delay < settings.retry_base:
        raise _refuse("retry_max_delay", "at least DOWNLOADER_RETRY_BASE", settings.retry_max_delay)
    for name in ("cartd_url", "event_sink", "public_url"):
        value = getattr(settings, name)
        if value and not value.startswith(("http://", "https://")):
            raise _refuse(name, "an http:// or https:// URL", value)
    if settings.database_url:
        scheme = settings.database_url.partition("://")[0]
        if scheme not in _DATABASE_SCHEMES:
            raise ValueError(
                "DOWNLOADER_DATABASE_URL must be sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB, "
                f"not a {scheme or 'scheme-less'} URL"
            )
    if settings.log_level.upper() not in _LOG_LEVELS:
        raise _refuse("log_level", " or ".join(_LOG_LEVELS), settings.log_level)
    try:
        check_layout(settings.layout)
    except ValueError as exc:
        raise ValueError(f"DOWNLOADER_LAYOUT: {exc}") from None
    if settings.bundle not in ("auto", "true", "false"):
        raise _refuse("bundle", "auto, true or false", settings.bundle)
    try:
        if not 0 <= settings.umask_bits() <= 0o777:
            raise ValueError
    except ValueError:
        raise _refuse("umask", "an octal number from 000 to 777", settings.umask) from None
    for name in ("basic_auth", "admin_basic_auth"):
        if getattr(settings, name) and ":" not in getattr(settings, name):
            raise ValueError(f"{_env_name(name)} must be user:password")
    sender = {settings.token, settings.basic_auth} - {""}
    if sender & {settings.admin_token, settings.admin_basic_auth}:
        raise ValueError(
            "the operators' credential must differ from the sender's (DOWNLOADER_TOKEN, _BASIC_AUTH)"
        )
    _check_tls(settings)
    if not settings.event_types:
        raise ValueError("DOWNLOADER_EVENT_TYPES must name at least one type")
    if not settings.filename or settings.filename in (".", "..") or "/" in settings.filename:
        raise _refuse("filename", "one directory name", settings.filename)
    _check_subscription(settings)


def _check_tls(settings: Settings) -> None:
    """The CA bundle and client certificate load, so a wrong file stops the start, not each job."""
    if settings.ca_bundle:
        try:
            check_ca_bundle(settings.ca_bundle)
        except ValueError as exc:
            raise ValueError(f"DOWNLOADER_CA_BUNDLE: {exc}") from None
    if settings.client_key and not settings.client_cert:
        raise ValueError("DOWNLOADER_CLIENT_KEY needs DOWNLOADER_CLIENT_CERT (the key's certificate)")
    if settings.client_cert:
        try:
            check_client_cert(settings.client_cert, settings.client_key or None)
        except ValueError as exc:
            raise ValueError(f"DOWNLOADER_CLIENT_CERT: {exc}") from None


def _check_subscription(settings: Settings) -> None:
    """The subscription guard's settings hang together (only with a Notifications URL)."""
    if not settings.notifications_url:
        return
    if not settings.notifications_url.startswith(("http://", "https://")):
        raise ValueError(
            f"DOWNLOADER_NOTIFICATIONS_URL must be an http(s) URL, not {settings.notifications_url!r}"
        )
    if not settings.notifications_user:
        raise ValueError("DOWNLOADER_NOTIFICATIONS_USER must name the subscription's Notifications user")
    if not settings.notifications_user_header:
        raise ValueError("DOWNLOADER_NOTIFICATIONS_USER_HEADER must not be empty")
    if not settings.public_url.startswith(("http://", "https://")):
        raise ValueError(
            "DOWNLOADER_PUBLIC_URL must be the URL Notifications posts to (the subscription's "
            "target) when DOWNLOADER_NOTIFICATIONS_URL is set"
        )
    if not settings.subscription_name:
        raise ValueError("DOWNLOADER_SUBSCRIPTION_NAME must not be empty")
    if not settings.subscription_check > 0:
        raise ValueError("DOWNLOADER_SUBSCRIPTION_CHECK must be above 0 seconds")
    compile_jsonpath(settings.subscription_jsonpath)


def describe() -> list[tuple[str, str, str]]:
    """``(variable, default, meaning)`` for every setting, for ``--help`` and the README."""
    rows = []
    for spec in fields(Settings):
        default = spec.default
        shown = ",".join(default) if isinstance(default, tuple) else str(default)
        rows.append((spec.metadata["env"], shown, spec.metadata["help"]))
    return rows
