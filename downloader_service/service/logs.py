"""JSON-lines logging for the service: one object per record, with the ``extra`` fields.

Secrets never reach a log line: every string a record carries (message, extras, traceback)
passes :func:`redact` first, CherryPy's access and error lines included.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Final, TextIO

# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
REDACTED: Final = "[REDACTED]"
# A query parameter whose name speaks of a secret: ?access_token=..., &client_secret=...
_SECRET_PARAM = re.compile(
    r"(?i)((?<![^\s?&;])[^=&;#\s\"']*(?:token|passw(?:or)?d|secret|api[-_]?key)[^=&;#\s\"']*=)[^&;#\s\"']*"
)
# An Authorization header's value: a header line (CherryPy's log_headers tool) or a dict's repr.
_AUTH_HEADER = re.compile(r"""(?i)((?:proxy-)?authorization["']?\s*[:=]\s*["']?)[^"'\r\n]+""")
# A field (an extra, a key of a logged dict) whose value is a secret as a whole.
_SECRET_NAME = re.compile(r"(?i)authorization|token|passw(?:or)?d|secret|api[-_]?key")
_MASKED: Final = rf"\1{REDACTED}"  # the pattern's first group kept, the secret masked
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s\"']+:)[^@/\s\"']+@")


def redact(text: str) -> str:
    """``text`` with secret query values, Authorization headers and URL passwords masked.

    Each pattern runs only on text holding the character it cannot match without (``=``,
    ``:`` or ``=``, ``@``): most strings of a record (ids, states, levels) hold none, and a
    substitution costs a call even when it finds nothing.
    """
    if "=" in text:
        text = _SECRET_PARAM.sub(_MASKED, text)
    if ":" in text or "=" in text:
        text = _AUTH_HEADER.sub(_MASKED, text)
    if "@" in text:
        text = _URL_PASSWORD.sub(_MASKED + "@", text)
    return text


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {
            key: REDACTED if isinstance(key, str) and _SECRET_NAME.search(key) else _redacted(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_redacted(item) for item in value]
    return value


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message and extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(_redacted(entry), default=lambda value: redact(str(value)), ensure_ascii=False)


def configure_json_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every log record (CherryPy's included) to ``stream`` as JSON lines."""
    # What a record would look up and our lines never show: the caller's file and line (a
    # walk of the stack), the thread's and the process's names and ids (the logging HOWTO's
    # "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    # On the handler, not only the root: CherryPy's loggers set INFO on themselves.
    handler.setLevel(level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic says "setup plugin ..." and "will assume transactional DDL" at every start: its
    # chatter belongs to DEBUG, our own INFO lines say what was done.
    logging.getLogger("alembic").setLevel("DEBUG" if level.upper() == "DEBUG" else "WARNING")
