"""Run the webhook as a process: CherryPy's HTTP server, its workers and the subscription guard.

Global state (logging, signal handlers, CherryPy's engine) is set up here, and for a worker
process alone in :func:`.worker.run_worker`, which imports no HTTP framework.
"""

from __future__ import annotations

import errno
import logging
import socket

import cherrypy
from cherrypy.process.plugins import Monitor

from .app import create_app
from .http import HEAD_LIMIT, HardenedServer
from .logs import configure_json_logging
from .settings import Settings
from .store import default_owner
from .subscription import SubscriptionGuard
from .worker import map_large_blocks, release_free_memory

LOGGER = logging.getLogger(__name__)
TRIM_SECONDS = 20.0


def serve(settings: Settings) -> None:
    """Configure logging and CherryPy, mount the app and block until a signal stops it.

    SIGTERM stops intake and claiming; running downloads get ``shutdown_grace`` seconds,
    then they are handed back to the store for the next worker. A port that cannot be
    listened on raises ``OSError`` before anything starts.
    """
    check_listen(settings.host, settings.port)
    configure_json_logging(settings.log_level)
    map_large_blocks()
    app = create_app(settings)
    cherrypy.tree.apps[""] = app
    cherrypy.config.update(
        {
            "server.socket_host": settings.host,
            "server.socket_port": settings.port,
            # Requests only write and read rows (a sync POST waits at most sync_wait).
            "server.thread_pool": settings.http_threads,
            # CherryPy's listen backlog of 5 resets connections of a burst (50 at once lost some).
            "server.socket_queue_size": 128,
            # The body limit is ours (413 as JSON), not cheroot's plain-text one.
            "server.max_request_body_size": 0,
            "server.max_request_header_size": HEAD_LIMIT,
            # Silence allowed on a connection; .http bounds the whole request by request_timeout.
            "server.socket_timeout": settings.idle_timeout,
            "engine.autoreload.on": False,
            "checker.on": False,
            "log.screen": False,
        }
    )
    # Slow or idle clients wait in cheroot's selector, not in the pool's threads (see .http).
    cherrypy.server.instance = HardenedServer(cherrypy.server, settings.request_timeout)
    # Waiting sync requests answer 202 at once (their jobs are safe in the store) ...
    cherrypy.engine.subscribe("stop", app.service.stop_waiting, priority=10)
    # ... and downloads get their grace after the HTTP server has stopped taking requests.
    cherrypy.engine.subscribe("stop", lambda: app.service.close(settings.shutdown_grace), priority=90)
    if app.service.worker is None:
        # An intake-only replica has no heartbeat to give freed C heap back (see the worker's).
        Monitor(cherrypy.engine, release_free_memory, frequency=TRIM_SECONDS, name="trim").subscribe()
    if settings.notifications_url:
        worker = app.service.worker
        guard = SubscriptionGuard(settings, app.service.store, worker.owner if worker else default_owner())
        # Enabled again only once this process takes events: after the HTTP server listens (75).
        cherrypy.engine.subscribe("start", guard.start, priority=80)
        cherrypy.engine.subscribe("stop", guard.stop, priority=5)
    LOGGER.info(
        "serving",
        extra={
            "host": settings.host,
            "port": settings.port,
            "cartd_url": settings.cartd_url,
            "download_root": settings.root(),
            "store": app.service.store.describe(),
            "workers": settings.workers,
            "event_types": list(settings.event_types),
        },
    )
    cherrypy.engine.signals.subscribe()
    cherrypy.engine.start()
    cherrypy.engine.block()


def check_listen(host: str, port: int) -> None:
    """Raise ``OSError`` saying why ``host:port`` cannot be listened on (in use, no such address).

    CherryPy finds out only after it has logged "serving", then exits 70 with the reason deep
    in a traceback; a person needs the reason in one line, before anything has started.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc)).lower()
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {why}") from exc
