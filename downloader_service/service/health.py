"""Liveness and readiness: what an orchestrator asks of a ``serve`` or ``worker`` process.

*Live* means the process answers: restart it if not. *Ready* means it can do its job now:
the job store takes a write, Cartd answers, the download root can be written and has room.
A process that is live but not ready should be left alone (Cartd may come back) and, for an
intake, taken out of a load balancer. A ``worker`` has no HTTP intake, so
:func:`serve_health` gives it a small server of its own (``DOWNLOADER_HEALTH_PORT``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

from .. import __version__
from ..cartapi import connection_problem, html_title
from ..errors import first_line
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ServiceMetrics
from .settings import Settings
from .store import JobStore, StoreError

LOGGER = logging.getLogger(__name__)
CARTD_PROBE_TIMEOUT = 2.0
_REFUSALS = frozenset({400, 401, 403, 407})


def readiness(settings: Settings, store: JobStore, session: requests.Session) -> tuple[bool, dict[str, Any]]:
    """``(ready, report)``: every check with its result, and the reason of each failure."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        store.ping()
        checks["store"] = {"ok": True, "url": store.describe()}
    except StoreError as exc:
        checks["store"] = {"ok": False, "url": store.describe(), "reason": str(exc)}
    try:
        options = settings.request_options()
        with session.get(settings.cartd_url + "/", timeout=CARTD_PROBE_TIMEOUT, **options) as resp:
            # A refusal is no Cartd either: a TLS terminator wanting another client certificate
            # answers 400, a proxy wanting credentials 401 or 407, and every cart would fail so.
            ok = resp.status_code < 500 and resp.status_code not in _REFUSALS
            checks["cartd"] = {"ok": ok, "url": settings.cartd_url, "status": resp.status_code}
            if not ok:
                checks["cartd"]["reason"] = f"Cartd answered {resp.status_code}{_title(resp)}"
    except (OSError, ValueError) as exc:
        # requests' errors are OSErrors, and so is its word for a certificate file gone since
        # the start; a ValueError is tls_options' for a file that no longer loads.
        problem = connection_problem(exc) if isinstance(exc, requests.RequestException) else first_line(exc)
        checks["cartd"] = {
            "ok": False,
            "url": settings.cartd_url,
            "reason": f"Cartd cannot be reached: {problem}",
        }
    checks["download_root"] = _root_check(settings)
    ready = all(check["ok"] for check in checks.values())
    return ready, {"status": "ready" if ready else "unavailable", "version": __version__, "checks": checks}


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """The readiness report without what only operators may see (paths, URLs, reasons, hosts)."""
    subscription = report.get("subscription") or {}
    public: dict[str, Any] = {
        "status": report["status"],
        "version": report["version"],
        "checks": {name: {"ok": check["ok"]} for name, check in report["checks"].items()},
    }
    if "jobs" in report:
        public["jobs"] = report["jobs"]
    if subscription:
        public["subscription"] = {
            "state": subscription.get("state"),
            "gaps": len(subscription.get("gaps", ())),
        }
    return public


def _root_check(settings: Settings) -> dict[str, Any]:
    root = settings.root()
    try:
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return {"ok": False, "path": root, "reason": f"cannot read {root}: {exc.strerror}"}
    check: dict[str, Any] = {"ok": True, "path": root, "free_bytes": free}
    if not os.access(root, os.W_OK | os.X_OK):
        check.update(ok=False, reason=f"{root} cannot be written")
    elif free < settings.min_free_bytes:
        check.update(
            ok=False,
            reason=f"{free} bytes free under {root}; DOWNLOADER_MIN_FREE_BYTES is {settings.min_free_bytes}",
        )
    return check


def _title(resp: requests.Response) -> str:
    """``: <title>`` of an HTML error page (nginx's "No required SSL certificate was sent")."""
    if "html" not in resp.headers.get("Content-Type", ""):
        return ""
    title = html_title(next(resp.iter_content(8192), b"").decode("utf-8", "replace"))
    return f": {title}" if title else ""


def serve_health(
    settings: Settings,
    port: int,
    ready: Callable[[], tuple[bool, dict[str, Any]]],
    metrics: ServiceMetrics,
) -> ThreadingHTTPServer:
    """Serve ``/health/live``, ``/health/ready`` and ``/metrics`` on a thread; returns the server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/metrics":
                self._send(200, metrics.render(), METRICS_CONTENT_TYPE)
            elif path == "/health/live":
                self._json(200, {"status": "live", "version": __version__})
            elif path in ("/health/ready", "/health"):
                ok, report = ready()
                self._json(200 if ok else 503, report)
            else:
                self._json(404, {"error": "not_found", "detail": f"no resource at {path!r}"})

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            LOGGER.debug("health request", extra={"line": format % args})

    server = ThreadingHTTPServer((settings.host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
