"""The webhook service: CloudEvents in, durable jobs, downloads by workers.

The path of an event: ``webhook`` (HTTP into a ``ReceivedEvent``) → ``app`` (the HTTP edge
commits a row) → ``store`` (jobs are rows) → ``worker`` (claim, download, record) with
``retry`` (when to try again). ``settings``, ``metrics``, ``logs`` and ``server`` serve them.
"""

from .app import create_app
from .settings import Settings, settings_from_env
from .store import JobStore, open_store

__all__ = ["JobStore", "Settings", "create_app", "open_store", "settings_from_env"]
