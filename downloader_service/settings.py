"""The webhook service's configuration: a frozen value with named defaults, read from the environment."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from .cartapi import DEFAULT_CART_API_URL, DEFAULT_CART_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8080
DEFAULT_EVENT_TYPES: Final = ("org.pacifica.metadata.ingest",)
DEFAULT_MAX_BODY_BYTES: Final = 10 * 1024 * 1024
DEFAULT_WORKERS: Final = 4
DEFAULT_QUEUE_SIZE: Final = 16
DEFAULT_RETRY_AFTER: Final = 5
DEFAULT_IDEMPOTENCY_SIZE: Final = 10_000
DEFAULT_ALLOWED_ORIGINS: Final = ("*",)
DEFAULT_ALLOWED_RATE: Final = 120
DEFAULT_FILENAME: Final = "data"


@dataclass(frozen=True)
class Settings:
    """Everything the service can be told. Field metadata names the environment variable."""

    host: str = field(
        default=DEFAULT_HOST, metadata={"env": "DOWNLOADER_HOST", "help": "address to listen on"}
    )
    port: int = field(default=DEFAULT_PORT, metadata={"env": "DOWNLOADER_PORT", "help": "port to listen on"})
    cartd_url: str = field(
        default=DEFAULT_CART_API_URL, metadata={"env": "CARTD_URL", "help": "Cartd's cart API URL"}
    )
    download_root: str = field(
        default="",
        metadata={
            "env": "DOWNLOADER_ROOT",
            "help": "where per-event download directories are made (default: the system temp dir, $TMPDIR)",
        },
    )
    event_types: tuple[str, ...] = field(
        default=DEFAULT_EVENT_TYPES,
        metadata={"env": "DOWNLOADER_EVENT_TYPES", "help": "comma-separated event types accepted"},
    )
    token: str = field(
        default="",
        metadata={
            "env": "DOWNLOADER_TOKEN",
            "help": "bearer token required on POST / and /jobs (empty: none)",
        },
    )
    max_body_bytes: int = field(
        default=DEFAULT_MAX_BODY_BYTES,
        metadata={"env": "DOWNLOADER_MAX_BODY_BYTES", "help": "largest request body accepted (413 above)"},
    )
    workers: int = field(
        default=DEFAULT_WORKERS, metadata={"env": "DOWNLOADER_WORKERS", "help": "downloads run at once"}
    )
    queue_size: int = field(
        default=DEFAULT_QUEUE_SIZE,
        metadata={"env": "DOWNLOADER_QUEUE_SIZE", "help": "downloads waiting for a worker before 429"},
    )
    respond_async: bool = field(
        default=False,
        metadata={
            "env": "DOWNLOADER_ASYNC",
            "help": "answer every POST 202 + status_url (else only with Prefer: respond-async)",
        },
    )
    retry_after: int = field(
        default=DEFAULT_RETRY_AFTER,
        metadata={"env": "DOWNLOADER_RETRY_AFTER", "help": "Retry-After seconds on 429"},
    )
    idempotency_size: int = field(
        default=DEFAULT_IDEMPOTENCY_SIZE,
        metadata={"env": "DOWNLOADER_IDEMPOTENCY_SIZE", "help": "events remembered for duplicate detection"},
    )
    allowed_origins: tuple[str, ...] = field(
        default=DEFAULT_ALLOWED_ORIGINS,
        metadata={
            "env": "DOWNLOADER_ALLOWED_ORIGINS",
            "help": "webhook origins allowed (comma-separated, * = all)",
        },
    )
    allowed_rate: int = field(
        default=DEFAULT_ALLOWED_RATE,
        metadata={"env": "DOWNLOADER_ALLOWED_RATE", "help": "requests per minute granted in the handshake"},
    )
    filename: str = field(
        default=DEFAULT_FILENAME,
        metadata={"env": "DOWNLOADER_FILENAME", "help": "directory inside download_path holding the files"},
    )
    cart_timeout: float = field(
        default=DEFAULT_CART_TIMEOUT,
        metadata={"env": "DOWNLOADER_CART_TIMEOUT", "help": "seconds to wait for Cartd to stage a cart"},
    )
    connect_timeout: float = field(
        default=DEFAULT_CONNECT_TIMEOUT,
        metadata={"env": "CARTD_CONNECT_TIMEOUT", "help": "seconds to connect to Cartd"},
    )
    read_timeout: float = field(
        default=DEFAULT_READ_TIMEOUT,
        metadata={"env": "CARTD_READ_TIMEOUT", "help": "seconds Cartd may stay silent mid-answer"},
    )
    log_level: str = field(
        default="INFO", metadata={"env": "DOWNLOADER_LOG_LEVEL", "help": "DEBUG, INFO, WARNING or ERROR"}
    )

    def root(self) -> str:
        """The download root, resolving the default at call time so ``TMPDIR`` applies."""
        return self.download_root or tempfile.gettempdir()


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "bool": _bool,
    "str": str,
    "tuple[str, ...]": _names,
}


def settings_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read every setting from ``environ`` (default ``os.environ``); ``overrides`` win.

    A malformed value raises ``ValueError`` naming the variable.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in fields(Settings):
        name = spec.metadata["env"]
        if name in environ:
            try:
                values[spec.name] = _PARSERS[str(spec.type)](environ[name])
            except ValueError as exc:
                raise ValueError(f"{name}={environ[name]!r}: {exc}") from exc
    values.update({key: value for key, value in overrides.items() if value is not None})
    settings = Settings(**values)
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    for name in ("workers", "max_body_bytes", "idempotency_size"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be at least 1")
    if settings.queue_size < 0 or settings.retry_after < 0:
        raise ValueError("queue_size and retry_after must not be negative")
    if not settings.event_types:
        raise ValueError("event_types must name at least one type")
    if not settings.filename or settings.filename in (".", "..") or "/" in settings.filename:
        raise ValueError(f"filename must be one directory name, not {settings.filename!r}")


def describe() -> list[tuple[str, str, str]]:
    """``(variable, default, meaning)`` for every setting, for ``--help`` and the README."""
    rows = []
    for spec in fields(Settings):
        default = spec.default
        shown = ",".join(default) if isinstance(default, tuple) else str(default)
        rows.append((spec.metadata["env"], shown, spec.metadata["help"]))
    return rows
