"""A Pacifica Policy stand-in on 127.0.0.1: ``GET /status/transactions/by_id/<id>`` from a dict.

Policy itself needs the whole metadata service and its database; the downloader only reads
this one document (``{"files": {"<file id>": {"name", "subdir", "hashtype", "hashsum", ...}}}``),
so tests serve it from :attr:`PolicyStandIn.transactions`. Unknown ids answer 404, as Policy
does. Every request is recorded in :attr:`PolicyStandIn.requests` (method, path, headers).

Usage::

    with PolicyStandIn() as policy:
        policy.transactions["67"] = {"files": {...}}
        requests.get(f"{policy.url}/status/transactions/by_id/67", timeout=5)
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

HOST = "127.0.0.1"
PREFIX = "/status/transactions/by_id/"


class PolicyStandIn:
    """The stand-in server; ``port=0`` picks a free port."""

    def __init__(self, port: int = 0, host: str = HOST) -> None:
        self.host = host
        self.port = port
        self.transactions: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        policy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                policy.requests.append(("GET", self.path, dict(self.headers)))
                path = self.path.split("?", 1)[0]
                doc = policy.transactions.get(path[len(PREFIX) :]) if path.startswith(PREFIX) else None
                if doc is None:
                    self._reply(404, {"status": "404 Not Found", "message": f"no transaction at {path}"})
                else:
                    self._reply(200, doc)

            def _reply(self, code: int, doc: Any) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
