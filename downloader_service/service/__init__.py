"""The webhook service: CloudEvents in, durable jobs, downloads by workers.

The path of an event: ``webhook`` (HTTP into a ``ReceivedEvent``) → ``app`` (the HTTP edge
commits a row) → ``store`` (jobs are rows) → ``worker`` (claim, download, record) with
``retry`` (when to try again). ``settings``, ``metrics``, ``logs`` and ``server`` serve them.

The names below are imported when first used: the command line imports ``settings`` for
every command, and CherryPy, SQLAlchemy and the rest cost a ``download`` 0.6 s and ~27 MB.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .settings import Settings, settings_from_env
    from .store import JobStore, open_store

__all__ = ["JobStore", "Settings", "create_app", "open_store", "settings_from_env"]
_MODULES = {
    "create_app": ".app",
    "Settings": ".settings",
    "settings_from_env": ".settings",
    "JobStore": ".store",
    "open_store": ".store",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name], __name__), name)
