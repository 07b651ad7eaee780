"""The webhook service: a thin CherryPy adapter from HTTP to :class:`JobRunner` and back.

``POST /`` takes CloudEvents, ``GET /jobs/<id>`` reports an asynchronous download,
``OPTIONS /`` answers the CloudEvents webhook handshake, ``GET /health`` and ``GET /metrics``
serve operators. Every answer, errors included, is JSON (metrics aside).
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
from collections.abc import Callable
from concurrent.futures import wait
from typing import Any

import cherrypy
import requests

from . import __version__
from .cloudevent import CloudEvent
from .downloader import Downloader
from .errors import (
    CartFailedError,
    CartTimeoutError,
    CartUnavailableError,
    DownloaderError,
    DownloadError,
    DownloadInterruptedError,
    IntegrityError,
    InvalidEventError,
    LocalStorageError,
    NoFilesError,
    PayloadTooLargeError,
    ServiceBusyError,
    UnsafeArchiveError,
    UnsupportedMediaTypeError,
)
from .jobs import DONE, Job, JobRunner, job_summary
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ServiceMetrics
from .settings import Settings
from .webhook import ReceivedEvent, parse_request

LOGGER = logging.getLogger(__name__)

# Error class -> (HTTP status, error kind). The first match wins, so subclasses come first.
# 4xx: sending the same request again cannot help; 429/5xx: it may.
ERROR_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (UnsupportedMediaTypeError, 415, "unsupported_media_type"),
    (PayloadTooLargeError, 413, "payload_too_large"),
    (NoFilesError, 400, "no_files"),
    (InvalidEventError, 400, "invalid_event"),
    (ServiceBusyError, 429, "busy"),
    (CartTimeoutError, 504, "cart_timeout"),
    (CartFailedError, 502, "cart_failed"),
    (CartUnavailableError, 502, "cartd_unavailable"),
    (UnsafeArchiveError, 502, "unsafe_archive"),
    (IntegrityError, 502, "integrity"),
    (DownloadInterruptedError, 502, "download_interrupted"),
    (LocalStorageError, 503, "storage"),
    (DownloadError, 502, "download_failed"),
    (DownloaderError, 500, "internal_error"),
)
JSON_TYPE = "application/json"


class HTTPError(Exception):
    """An answer decided in the web layer itself (401, 404, 403)."""

    def __init__(self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers = status, kind, detail, headers or {}


def error_status(exc: Exception) -> tuple[int, str]:
    """The HTTP status and error kind that tell a sender what ``exc`` means for a retry."""
    for cls, status, kind in ERROR_STATUS:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal_error"


def error_body(exc: Exception) -> dict[str, Any]:
    """``{"error": kind, "detail": ...}`` for an exception, with its context where it has one."""
    _status, kind = error_status(exc)
    body: dict[str, Any] = {
        "error": kind,
        "detail": str(exc) if isinstance(exc, DownloaderError) else "internal error",
    }
    if isinstance(exc, DownloaderError):
        body["retryable"] = exc.retryable
        for key in ("field", "object", "member", "path", "url"):
            if key in exc.context:
                body[key] = exc.context[key]
    return body


class Service:
    """What the resources share: settings, the job runner and the metrics."""

    def __init__(
        self, settings: Settings, downloader: Downloader, runner: JobRunner, metrics: ServiceMetrics
    ):
        self.settings = settings
        self.downloader = downloader
        self.runner = runner
        self.metrics = metrics

    def status_url(self, job: Job) -> str:
        """Where to ask about ``job``, absolute when the request tells us our address."""
        return f"{cherrypy.request.base}{cherrypy.request.script_name}/jobs/{job.id}"

    def check_token(self, params: dict[str, Any]) -> None:
        """Refuse a request without the configured bearer token (header or ``access_token``)."""
        token = self.settings.token
        if not token:
            return
        header = cherrypy.request.headers.get("Authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else str(params.get("access_token", ""))
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPError(
                401, "unauthorized", "a valid bearer token is required", {"WWW-Authenticate": "Bearer"}
            )

    def read_body(self) -> bytes:
        """Read the request body, refusing more than ``max_body_bytes`` without reading it all."""
        limit = self.settings.max_body_bytes
        declared = cherrypy.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            cherrypy.response.headers["Connection"] = "close"
            raise PayloadTooLargeError(f"the body is {declared} bytes; the limit is {limit}", field="body")
        body: bytes = cherrypy.request.rfile.read(limit + 1)
        if len(body) > limit:
            cherrypy.response.headers["Connection"] = "close"
            raise PayloadTooLargeError(f"the body is over the limit of {limit} bytes", field="body")
        return body

    def accept(self, events: list[ReceivedEvent]) -> list[tuple[Job, bool]]:
        """Validate every event first (nothing starts for a bad batch), then start jobs."""
        checked = []
        for event in events:
            if event.type not in self.settings.event_types:
                raise InvalidEventError(
                    f"event {event.id!r} has type {event.type!r}; this service takes "
                    + ", ".join(self.settings.event_types),
                    field="type",
                )
            checked.append((event, CloudEvent.files(event.document())))
        return [self.runner.submit(event.id, event.key, files) for event, files in checked]


def json_handler(method: Callable[..., Any]) -> Callable[..., bytes]:
    """Serve a handler's dict as JSON and turn every exception into a JSON error.

    The MethodDispatcher hands extra path segments over as positional arguments; a handler
    taking fewer than it was given answers 404, like a missing resource.
    """
    path_args = method.__code__.co_argcount - 1

    @functools.wraps(method)
    def handler(self: Any, *args: Any, **kwargs: Any) -> bytes:
        service: Service = self.service
        try:
            if len(args) > path_args:
                raise HTTPError(404, "not_found", f"no resource at {cherrypy.request.path_info!r}")
            body = method(self, *args, **kwargs)
        except HTTPError as exc:
            cherrypy.response.status = exc.status
            cherrypy.response.headers.update(exc.headers)
            body = {"error": exc.kind, "detail": exc.detail}
            service.metrics.errors.labels(kind=exc.kind).inc()
        except Exception as exc:
            status, kind = error_status(exc)
            if not isinstance(exc, DownloaderError):
                LOGGER.exception("request failed")
            if isinstance(exc, ServiceBusyError):
                cherrypy.response.headers["Retry-After"] = str(service.settings.retry_after)
                service.metrics.events.labels(outcome="busy").inc()
            elif status < 500:
                service.metrics.events.labels(outcome="rejected").inc()
                LOGGER.info("request rejected", extra={"status": status, "kind": kind, "detail": str(exc)})
            service.metrics.errors.labels(kind=kind).inc()
            cherrypy.response.status = status
            body = error_body(exc)
        cherrypy.response.headers["Content-Type"] = JSON_TYPE
        return json.dumps(body).encode()

    return handler


def _job_answer(service: Service, job: Job, started: bool) -> tuple[int, dict[str, Any]]:
    """The status and body for a job as it stands now."""
    body = job_summary(job)
    body["status_url"] = service.status_url(job)
    if not started:
        body["duplicate"] = True
    if not job.finished:
        return 202, body
    if job.state == DONE:
        return 200, body
    error = job.error or RuntimeError("the job failed without an error")
    status, _kind = error_status(error)
    return status, {**body, **error_body(error)}


@cherrypy.expose
class Jobs:
    """``GET /jobs/<id>``: the state of an asynchronous download."""

    def __init__(self, service: Service) -> None:
        self.service = service

    @json_handler
    def GET(self, job_id: str = "", **params: Any) -> dict[str, Any]:
        self.service.check_token(params)
        job = self.service.runner.get(job_id)
        if job is None:
            raise HTTPError(404, "not_found", f"no job {job_id!r} (unknown, or forgotten long ago)")
        _status, body = _job_answer(self.service, job, started=True)
        return body


@cherrypy.expose
class Health:
    """``GET /health``: the service answers, and says whether Cartd does."""

    def __init__(self, service: Service) -> None:
        self.service = service

    @json_handler
    def GET(self) -> dict[str, Any]:
        api = self.service.downloader.cart_api
        cartd: dict[str, Any]
        try:
            with api.session.get(api.cart_api_url + "/", timeout=(2, 2)) as resp:
                cartd = {"reachable": True, "status": resp.status_code}
        except requests.RequestException as exc:
            cartd = {"reachable": False, "detail": str(exc)}
        return {
            "status": "ok",
            "version": __version__,
            "cartd": {"url": api.cart_api_url, **cartd},
            "jobs_in_flight": self.service.runner.in_flight(),
        }


@cherrypy.expose
class Metrics:
    """``GET /metrics`` in the Prometheus text format."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def GET(self) -> bytes:
        cherrypy.response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return self.service.metrics.render()


@cherrypy.expose
class Root:
    """``POST /`` takes events; ``OPTIONS /`` is the webhook handshake."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.jobs = Jobs(service)
        self.health = Health(service)
        self.metrics = Metrics(service)

    @json_handler
    def GET(self) -> dict[str, Any]:
        return {
            "service": "pacifica-downloader-service",
            "version": __version__,
            "post": "CloudEvents (structured, binary, batch, or Notifications 0.1 as application/json)",
            "event_types": list(self.service.settings.event_types),
        }

    @json_handler
    def POST(self, **params: Any) -> dict[str, Any]:
        service = self.service
        service.check_token(params)
        events = parse_request(dict(cherrypy.request.headers), service.read_body())
        prefer = cherrypy.request.headers.get("Prefer", "").lower()
        respond_async = service.settings.respond_async or "respond-async" in prefer
        accepted = service.accept(events)
        if not respond_async:
            wait([job.future for job, started in accepted if started])
        else:
            cherrypy.response.headers["Preference-Applied"] = "respond-async"
        answers = [_job_answer(service, job, started) for job, started in accepted]
        for job, started in accepted:
            if not started:
                service.metrics.events.labels(outcome="duplicate").inc()
            LOGGER.info(
                "event accepted",
                extra={
                    "event_id": job.event_id,
                    "job_id": job.id,
                    "duplicate": not started,
                    "state": job.state,
                },
            )
        if len(events) == 1 and events[0].mode != "batch":
            status, body = answers[0]
            if status == 202:
                cherrypy.response.headers["Location"] = body["status_url"]
        else:
            # A batch answers with its worst outcome: any failure decides the status.
            status = max((s for s, _ in answers), key=lambda s: (s >= 400, s))
            body = {"events": [b for _s, b in answers]}
        cherrypy.response.status = status
        return body

    def OPTIONS(self) -> bytes:
        """The CloudEvents webhook abuse-protection handshake (validation request)."""
        origin = cherrypy.request.headers.get("WebHook-Request-Origin")
        allowed = self.service.settings.allowed_origins
        cherrypy.response.headers["Allow"] = "GET, POST, OPTIONS"
        cherrypy.response.headers["Content-Type"] = JSON_TYPE
        if origin is None:
            return b"{}"
        if "*" not in allowed and origin not in allowed:
            cherrypy.response.status = 403
            return json.dumps(
                {"error": "origin_not_allowed", "detail": f"origin {origin!r} is not allowed"}
            ).encode()
        cherrypy.response.headers["WebHook-Allowed-Origin"] = origin
        cherrypy.response.headers["WebHook-Allowed-Rate"] = str(self.service.settings.allowed_rate)
        return b"{}"


def _error_page(status: str, message: str, traceback: str, version: str) -> str:
    """CherryPy's own errors (404, 405, ...) as JSON instead of an HTML page."""
    cherrypy.response.headers["Content-Type"] = JSON_TYPE
    code = int(status.split()[0])
    kind = {404: "not_found", 405: "method_not_allowed"}.get(code, "http_error")
    return json.dumps({"error": kind, "detail": message if code < 500 else "internal error"})


def create_app(settings: Settings, downloader: Downloader | None = None) -> cherrypy.Application:
    """Build the WSGI application; ``app.service.runner.shutdown()`` stops its workers."""
    downloader = downloader or Downloader(
        None,
        settings.cartd_url,
        cart_timeout=settings.cart_timeout,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
    )
    metrics = ServiceMetrics()
    service = Service(settings, downloader, JobRunner(settings, downloader, metrics), metrics)
    config = {
        "/": {
            "request.dispatch": cherrypy.dispatch.MethodDispatcher(),
            "request.process_request_body": False,
            "request.show_tracebacks": False,
            "error_page.default": _error_page,
            "tools.encode.on": False,
        }
    }
    app = cherrypy.Application(Root(service), script_name="", config=config)
    app.service = service
    app.log.screen = False  # access and error lines go to logging, which serve() configures
    return app
