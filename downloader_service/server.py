"""Run the webhook app on CherryPy's own HTTP server: the one place global state is set up."""

from __future__ import annotations

import logging

import cherrypy

from .logs import configure_json_logging
from .service import create_app
from .settings import Settings

LOGGER = logging.getLogger(__name__)


def serve(settings: Settings) -> None:
    """Configure logging and CherryPy, mount the app and block until a signal stops it."""
    configure_json_logging(settings.log_level)
    app = create_app(settings)
    cherrypy.tree.apps[""] = app
    cherrypy.config.update(
        {
            "server.socket_host": settings.host,
            "server.socket_port": settings.port,
            # Sync requests hold a thread for a whole download: leave room to answer 429s.
            "server.thread_pool": settings.workers + settings.queue_size + 8,
            # CherryPy's listen backlog of 5 resets connections of a burst (50 at once lost some).
            "server.socket_queue_size": 128,
            # The body limit is ours (413 as JSON), not cheroot's plain-text one.
            "server.max_request_body_size": 0,
            "engine.autoreload.on": False,
            "checker.on": False,
            "log.screen": False,
        }
    )
    cherrypy.engine.subscribe("stop", lambda: app.service.runner.shutdown(wait=False))
    LOGGER.info(
        "serving",
        extra={
            "host": settings.host,
            "port": settings.port,
            "cartd_url": settings.cartd_url,
            "download_root": settings.root(),
            "event_types": list(settings.event_types),
        },
    )
    cherrypy.engine.signals.subscribe()
    cherrypy.engine.start()
    cherrypy.engine.block()
