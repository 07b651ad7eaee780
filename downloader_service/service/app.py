"""The HTTP edge: a thin CherryPy adapter that writes job rows and reads them back.

``POST /`` takes CloudEvents and commits one job per event to the store *before* it answers;
``/jobs`` lists, shows, retries and deletes jobs; ``OPTIONS /`` answers the CloudEvents
webhook handshake; ``GET /health`` and ``GET /metrics`` serve operators. Every answer,
errors included, is JSON (metrics aside). Downloads run in :mod:`.worker`, never here.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import cherrypy
from cherrypy import _cplogging, _cpwsgi
from cherrypy.lib import httputil

from .. import __version__
from ..downloader import Downloader
from ..errors import DownloaderError
from ..progress import DownloadProgress
from . import page, subscription
from .auth import Access, Denied, check_same_origin
from .errors import PayloadTooLargeError
from .events import CART_DELETE
from .health import public_report, readiness
from .intake import Intake
from .jobs import ErrorKind, Job, JobError, JobState, error_kind
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ServiceMetrics
from .settings import Settings
from .store import JobStore, StoreError, open_store
from .webhook import ReceivedEvent, check_media_type, parse_request
from .worker import Worker, build_worker, downloader_factory, prepare_root, remove_download

LOGGER = logging.getLogger(__name__)

# Error kind -> HTTP status. 4xx: sending the same request again cannot help; 429/5xx: it may.
# What each error kind answers: 4xx when the request itself is at fault (sending it again
# cannot help), 429/503 when waiting can, 502/504 when Cartd or the download failed. Every
# ErrorKind has one (tests/unit/test_service.py checks): none becomes a 500 by accident.
KIND_STATUS: Final[dict[ErrorKind, int]] = {
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorKind.PAYLOAD_TOO_LARGE: 413,
    ErrorKind.NO_FILES: 400,
    ErrorKind.INVALID_EVENT: 400,
    ErrorKind.INVALID_INPUT: 400,
    ErrorKind.BUSY: 429,
    ErrorKind.CART_TIMEOUT: 504,
    ErrorKind.CART_GONE: 502,
    ErrorKind.CART_FAILED: 502,
    ErrorKind.CARTD_UNAVAILABLE: 502,
    ErrorKind.UNSAFE_ARCHIVE: 502,
    ErrorKind.INTEGRITY: 502,
    ErrorKind.DOWNLOAD_INTERRUPTED: 502,
    ErrorKind.STORAGE: 503,
    ErrorKind.DOWNLOAD_FAILED: 502,
    ErrorKind.POLICY_UNAVAILABLE: 502,
    ErrorKind.STORE_UNAVAILABLE: 503,
    ErrorKind.WORKER_DIED: 500,
    ErrorKind.INTERNAL_ERROR: 500,
}
JSON_TYPE = "application/json"
LIST_LIMIT_MAX = 500
# While a sync POST waits, its job's end wakes it (see .ends); it still reads the store: every
# SYNC_POLL[0] seconds at first, backing off to SYNC_POLL[1], when ends in other processes cannot
# reach it (SQLite), and every SYNC_POLL[2] seconds while a PostgreSQL listener says they do.
SYNC_POLL: Final = (0.02, 0.25, 2.0)


class HTTPError(Denied):
    """An answer decided in the web layer itself (404, 409, 400)."""


def error_status(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and error kind that tell a sender what ``exc`` means for a retry."""
    kind = ErrorKind.STORE_UNAVAILABLE if isinstance(exc, StoreError) else error_kind(exc)
    return KIND_STATUS[kind], kind


def kind_status(kind: str) -> int:
    """The status of a kind read back from the store (500 for one this version does not know)."""
    try:
        return KIND_STATUS[ErrorKind(kind)]
    except ValueError:
        return 500


def error_body(exc: BaseException) -> dict[str, Any]:
    """``{"error": kind, "detail": ...}`` for an exception, with its context where it has one."""
    _status, kind = error_status(exc)
    if not isinstance(exc, DownloaderError):
        return {"error": kind, "detail": "internal error"}
    return {**JobError.of(exc).body(), "error": kind}


class Service:
    """What the resources share: settings, the store, this process's worker, the metrics."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        make_downloader: Callable[[DownloadProgress], Downloader],
        metrics: ServiceMetrics,
        worker: Worker | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.make_downloader = make_downloader
        self.metrics = metrics
        self.worker = worker
        self.access = Access(settings)
        self.intake = Intake(settings, store, metrics, worker.wake if worker is not None else lambda: None)
        self.stopping = threading.Event()
        self.sync_poll = SYNC_POLL

    def stop_waiting(self) -> None:
        """Answer waiting sync requests at once (their jobs are safe in the store): stopping."""
        self.stopping.set()
        self.store.ends.wake_all("stopping")

    def close(self, grace: float = 0.0) -> None:
        """Stop the worker (running downloads get ``grace`` seconds) and the store."""
        self.stop_waiting()
        if self.worker is not None:
            self.worker.stop(grace)
        self.store.close()

    def base_url(self) -> str:
        """Our URL: ``DOWNLOADER_PUBLIC_URL``, else what the request says (its Host header)."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        return f"{cherrypy.request.base}{cherrypy.request.script_name}"

    def status_url(self, job: Job) -> str:
        """Where to ask about ``job``."""
        return f"{self.base_url()}/jobs/{job.id}"

    def check_sender(self, params: dict[str, Any]) -> None:
        """Refuse ``POST /`` without the sender's credential, or sent by another site's page."""
        headers = cherrypy.request.headers
        check_same_origin(cherrypy.request.method, headers, self.base_url())
        self.access.check_sender(headers, params)

    def is_operator(self, params: dict[str, Any]) -> bool:
        """Whether this request may see and change jobs (see :mod:`.auth`)."""
        return self.access.is_operator(cherrypy.request.headers, params, cherrypy.request.remote.ip or "")

    def check_operator(self, params: dict[str, Any]) -> None:
        """Refuse the operator surface to the sender's credential, strangers and other sites."""
        headers = cherrypy.request.headers
        check_same_origin(cherrypy.request.method, headers, self.base_url())
        self.access.check_operator(headers, params, cherrypy.request.remote.ip or "")

    def read_body(self) -> bytes:
        """Read the request body, refusing more than ``max_body_bytes`` without reading it all.

        A body whose framing is broken (a chunk size that is not hex, a negative length)
        answers 400, one that does not arrive by the request's deadline 408; both close the
        connection, whose stream can no longer be trusted.
        """
        limit = self.settings.max_body_bytes
        declared = cherrypy.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            cherrypy.response.headers["Connection"] = "close"
            raise PayloadTooLargeError(f"the body is {declared} bytes; the limit is {limit}", field="body")
        close = {"Connection": "close"}
        try:
            body: bytes = cherrypy.request.rfile.read(limit + 1)
        except TimeoutError as exc:
            raise HTTPError(408, "request_timeout", "the body did not arrive in time", close) from exc
        except ValueError as exc:  # cheroot's ChunkedRFile, or a reader given a negative length
            raise HTTPError(400, "bad_request", f"the body's framing is broken: {exc}", close) from exc
        except OSError as exc:
            raise HTTPError(400, "bad_request", f"the body could not be read: {exc}", close) from exc
        if len(body) > limit:
            cherrypy.response.headers["Connection"] = "close"
            raise PayloadTooLargeError(f"the body is over the limit of {limit} bytes", field="body")
        return body

    def accept(self, events: Sequence[ReceivedEvent], log_accepted: bool = True) -> list[tuple[Job, bool]]:
        """Store the events as jobs before any answer (see :meth:`.Intake.accept`)."""
        return self.intake.accept(events, log_accepted)

    def wait(self, jobs: list[Job], timeout: float) -> list[Job]:
        """Wait until every job has finished, ``timeout`` passes or the service stops.

        Woken when one of the jobs ends (see :mod:`.ends`); the store is read after each wake
        and each pause of :data:`SYNC_POLL`, in case a wake was lost.
        """
        if not jobs:
            return jobs
        deadline = time.monotonic() + timeout
        ids = [job.id for job in jobs]
        first, longest, listening = self.sync_poll
        pause = first
        with self.store.ends.watch(ids) as watch:
            # Read once more now that an end wakes us: a job that ended before is in this read.
            jobs = self.store.get_many(ids)
            while not all(job.finished for job in jobs) and not self.stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                watch.wait(min(listening if self.store.ends.listening else pause, remaining))
                pause = min(pause * 2, longest)
                jobs = self.store.get_many(ids)
        return jobs

    def answer(self, job: Job, created: bool = True) -> tuple[int, dict[str, Any]]:
        """The status and body for a job as it stands now.

        A 2xx means the event is safe in the store. Only in strict mode does a job that has
        ended badly (rejected, or failed for good) answer with its error's status.
        """
        body = job.summary()
        body["status_url"] = self.status_url(job)
        if not created:
            body["duplicate"] = True
        if job.conflicted:
            body["conflict"] = True
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            return 202, body
        if job.state == JobState.DONE:
            return 200, body
        if job.error is not None and self.settings.strict:
            return kind_status(job.error.kind), body
        return 200, body


def refuse(service: Service, exc: Denied) -> dict[str, Any]:
    """Answer a :class:`~.auth.Denied`: its status and headers, counted; the JSON body to send."""
    cherrypy.response.status = exc.status
    cherrypy.response.headers.update(exc.headers)
    service.metrics.errors.labels(kind=exc.kind).inc()
    return {"error": exc.kind, "detail": exc.detail}


def single_values(params: dict[str, Any]) -> None:
    """Refuse a query parameter given more than once (CherryPy makes a list of it): 400."""
    for name, value in params.items():
        if isinstance(value, list):
            raise HTTPError(400, "bad_request", f"the query parameter {name!r} is given {len(value)} times")


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
            single_values(kwargs)
            body = method(self, *args, **kwargs)
        except Denied as exc:
            body = refuse(service, exc)
        except Exception as exc:
            status, kind = error_status(exc)
            if not isinstance(exc, DownloaderError):
                LOGGER.exception("request failed")
            if status in (429, 503):
                cherrypy.response.headers["Retry-After"] = str(service.settings.retry_after)
                service.metrics.events.labels(outcome="busy").inc()
            elif status < 500:
                service.metrics.events.labels(outcome="invalid").inc()
            LOGGER.info("request refused", extra={"status": status, "kind": kind, "detail": str(exc)})
            service.metrics.errors.labels(kind=kind).inc()
            cherrypy.response.status = status
            body = error_body(exc)
        cherrypy.response.headers["Content-Type"] = JSON_TYPE
        return json.dumps(body).encode()

    return handler


@cherrypy.expose
class Jobs:
    """``/jobs``: list; ``/jobs/<id>``: show, ``DELETE``; ``POST /jobs/<id>/retry``."""

    def __init__(self, service: Service) -> None:
        self.service = service

    @json_handler
    def GET(self, job_id: str = "", **params: Any) -> dict[str, Any]:
        self.service.check_operator(params)
        if not job_id:
            return self._list(params)
        body = self.service.answer(self._job(job_id))[1]
        events = [event for event in self.service.store.deliveries(job_id) if event.type != CART_DELETE]
        if events:
            body["completion_events"] = [event.summary() for event in events]
        return body

    @json_handler
    def POST(self, job_id: str = "", action: str = "", **params: Any) -> dict[str, Any]:
        self.service.check_operator(params)
        if action != "retry":
            raise HTTPError(404, "not_found", "POST /jobs/<id>/retry is the only action")
        job = self._job(job_id)
        if job.state not in (JobState.FAILED, JobState.QUEUED):
            raise HTTPError(
                409, "conflict", f"job {job_id} is {job.state}; only failed or queued jobs are retried"
            )
        job = self.service.store.retry(job_id) or job
        if self.service.worker is not None:
            self.service.worker.wake()
        LOGGER.info("job retry requested", extra={"job_id": job_id, "event_id": job.event_id})
        cherrypy.response.status = 202
        return self.service.answer(job)[1]

    @json_handler
    def DELETE(self, job_id: str = "", **params: Any) -> dict[str, Any]:
        self.service.check_operator(params)
        job = self._job(job_id)
        if job.state == JobState.RUNNING:
            raise HTTPError(409, "conflict", f"job {job_id} is running; delete it when it has ended")
        removed = remove_download(job, self.service.settings)
        self.service.store.delete(job_id)
        LOGGER.info(
            "job deleted", extra={"job_id": job_id, "event_id": job.event_id, "download_removed": removed}
        )
        return {"deleted": job_id, "download_removed": removed}

    def _job(self, job_id: str) -> Job:
        job = self.service.store.get(job_id, contents=False) if job_id else None
        if job is None:
            raise HTTPError(404, "not_found", f"no job {job_id!r}")
        return job

    def _list(self, params: dict[str, Any]) -> dict[str, Any]:
        state = params.get("state") or None
        try:
            limit = int(params.get("limit", 50))
        except ValueError:
            limit = 0
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise HTTPError(400, "bad_request", f"limit must be a number from 1 to {LIST_LIMIT_MAX}")
        try:
            found = self.service.store.list_jobs(state, limit + 1, params.get("before") or None)
        except ValueError as exc:
            raise HTTPError(400, "bad_request", str(exc)) from exc
        except KeyError as exc:
            raise HTTPError(400, "bad_request", f"no job {exc.args[0]!r} to page from") from exc
        page = found[:limit]
        base = f"{self.service.base_url()}/jobs"
        after = f"?limit={limit}" + (f"&state={state}" if state else "")
        return {
            "jobs": [{**self.service.answer(job)[1]} for job in page],
            "next": f"{base}{after}&before={page[-1].id}" if len(found) > limit else None,
        }


@cherrypy.expose
class Health:
    """``GET /health/live`` (the process answers) and ``GET /health/ready`` (or ``/health``).

    Ready: the store takes writes, Cartd answers, the download root has room; else ``503``.
    """

    def __init__(self, service: Service) -> None:
        self.service = service

    @json_handler
    def GET(self, which: str = "", **params: Any) -> dict[str, Any]:
        if which == "live":
            return {"status": "live", "version": __version__}
        if which not in ("", "ready"):
            raise HTTPError(404, "not_found", f"no resource at {cherrypy.request.path_info!r}")
        session = self.service.make_downloader(DownloadProgress()).cart_api.session
        ready, report = readiness(self.service.settings, self.service.store, session)
        if ready:
            report["jobs"] = self.service.store.stats()["jobs"]
        worker = self.service.worker
        report["worker"] = None if worker is None else {"owner": worker.owner, "running": worker.busy()}
        # Reported, never a reason for 503: an open gap is for an operator to replay, and taking
        # the intake out of a load balancer would only make another one.
        try:
            report["subscription"] = subscription.report(self.service.settings, self.service.store)
        except StoreError as exc:
            report["subscription"] = {"state": subscription.SubscriptionState.UNKNOWN, "reason": str(exc)}
        if not ready:
            cherrypy.response.status = 503
            cherrypy.response.headers["Retry-After"] = str(self.service.settings.retry_after)
        # Paths, URLs and reasons are for operators; a load balancer needs only the verdict.
        return report if self.service.is_operator(params) else public_report(report)


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

    def GET(self, *args: Any, **params: Any) -> bytes:
        """About the service, in JSON; a browser (``Accept`` prefers HTML) gets the jobs page."""
        if args or not page.wants_html(cherrypy.request.headers.get("Accept", "")):
            return self._about(*args)
        try:
            single_values(params)
            self.service.check_operator(params)
        except Denied as exc:
            # A 401 with its challenge: the browser asks for basic auth credentials.
            cherrypy.response.headers["Content-Type"] = JSON_TYPE
            return json.dumps(refuse(self.service, exc)).encode()
        return page.respond(self.service.store, params, self.service.settings.notifications_url != "")

    @json_handler
    def _about(self) -> dict[str, Any]:
        return {
            "service": "pacifica-downloader-service",
            "version": __version__,
            "post": "CloudEvents (structured, binary, batch, or Notifications 0.1 as application/json)",
            "event_types": list(self.service.settings.event_types),
        }

    @json_handler
    def POST(self, **params: Any) -> dict[str, Any]:
        service = self.service
        service.check_sender(params)
        headers = dict(cherrypy.request.headers)
        check_media_type(headers)  # credentials and media type from the head, then the body
        events = parse_request(headers, service.read_body())
        prefer = cherrypy.request.headers.get("Prefer", "").lower()
        respond_async = service.settings.respond_async or "respond-async" in prefer
        single = len(events) == 1 and events[0].mode != "batch"
        # One event: its job goes into the request's access line instead of a line of its own.
        accepted = service.accept(events, log_accepted=not single)
        jobs = [job for job, _created in accepted]
        if respond_async:
            cherrypy.response.headers["Preference-Applied"] = "respond-async"
        else:
            # Wait for the downloads this request started; a duplicate answers as it stands.
            started = [job for job, created in accepted if created]
            finished = {job.id: job for job in service.wait(started, service.settings.sync_wait)}
            jobs = [finished.get(job.id, job) for job in jobs]
        answers = [service.answer(job, created) for job, (_old, created) in zip(jobs, accepted, strict=True)]
        if single:
            status, body = answers[0]
            if status == 202:
                cherrypy.response.headers["Location"] = body["status_url"]
            cherrypy.request.access_extra = {
                "event_id": jobs[0].event_id,
                "job_id": jobs[0].id,
                "state": jobs[0].state,
                "duplicate": not accepted[0][1],
            }
        else:
            # A batch answers with its worst outcome: an error first, then "still running".
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
        # No WebHook-Allowed-Rate: every valid event is stored, none is refused for its rate,
        # so advertising a limit that nothing enforces would only mislead the sender.
        cherrypy.response.headers["WebHook-Allowed-Origin"] = origin
        return b"{}"


class _Request:
    """What ``Root.POST`` reads of ``cherrypy.request``, for a request CherryPy does not parse."""

    __slots__ = ("access_extra", "base", "headers", "method", "rfile", "script_name")

    def __init__(self, headers: dict[str, str], base: str, rfile: Any) -> None:
        self.method = "POST"
        self.headers = headers
        self.base = base
        self.script_name = ""
        self.rfile = rfile
        self.access_extra: dict[str, Any] | None = None


class _Response:
    """What ``Root.POST`` sets of ``cherrypy.response``: a status and headers."""

    __slots__ = ("headers", "status")

    def __init__(self) -> None:
        self.status: int | str = 200
        self.headers: dict[str, str] = {}


class Application(cherrypy.Application):  # type: ignore[misc]
    """The CherryPy application, with ``POST /`` served past CherryPy's request machinery.

    ``POST /`` is the intake, the one request that comes by the hundred a second. CherryPy's
    request and response objects, its dispatch, hooks and access line cost more CPU per event
    than the intake's own work (py-spy: ~0.2 ms of Python an event). So a plain ``POST /`` (no
    query string, a ``Host`` header, no cookies) runs the same handler, ``Root.POST`` (the
    sender's credential, the body limit, media types, the answers and error statuses) with
    light stand-ins for ``cherrypy.request`` and ``cherrypy.response``, built from the WSGI
    environ as CherryPy builds its own; its access line is CherryPy's, with the job in it.
    Every other request, and any ``POST /`` out of the ordinary, is CherryPy's.
    """

    def __init__(self, root: Root, script_name: str = "", config: dict[str, Any] | None = None) -> None:
        super().__init__(root, script_name, config)
        # What CherryPy's MethodDispatcher says of the root resource in every answer.
        methods = {name for name in dir(root) if name.isupper()}
        self._allow = ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if (
            environ["REQUEST_METHOD"] == "POST"
            and environ.get("PATH_INFO") == "/"
            and not environ.get("SCRIPT_NAME")
            and not environ.get("QUERY_STRING")
            and "HTTP_HOST" in environ
            and "HTTP_COOKIE" not in environ
        ):
            return self._post(environ, start_response)
        return self.wsgiapp(environ, start_response)

    def _post(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        # The request's headers as CherryPy's (_cpwsgi.AppResponse.translate_headers, then
        # Request.process_headers) would have them: title-cased names, stripped and decoded values.
        names = _CGI_HEADER_NAMES
        headers: dict[str, str] = {}
        for key, value in environ.items():
            name = names.get(key)
            if name is None:
                if key[:5] != "HTTP_":
                    continue
                name = key[5:].replace("_", "-")
            headers[name.title()] = httputil.decode_TEXT_maybe(value.strip())
        host = headers["Host"] = httputil.SanitizedHost(headers["Host"])
        request = _Request(
            headers,
            f"{environ['wsgi.url_scheme']}://{host or environ.get('SERVER_NAME', '')}",
            environ["wsgi.input"],
        )
        response = _Response()
        cherrypy.serving.load(request, response)
        try:
            body = self.root.POST()
            code, reason, _message = httputil.valid_status(response.status)
            out = {
                "Content-Type": JSON_TYPE,
                "Server": _SERVER,
                "Date": _http_date(),
                "Allow": self._allow,
                **response.headers,
                "Content-Length": str(len(body)),
            }
            listed = [
                (name.decode("ISO-8859-1"), value.decode("ISO-8859-1"))
                for name, value in httputil.HeaderMap.encode_header_items(out.items())
            ]
            _access(self.log, environ, code, out["Content-Length"], headers)
        finally:
            cherrypy.serving.clear()
        start_response(f"{code} {reason}", listed)
        return [body]


_CGI_HEADER_NAMES: Final[dict[str, str]] = dict(_cpwsgi.AppResponse.headerNames)
_SERVER: Final = f"CherryPy/{cherrypy.__version__}"
_date = (0, "")  # the Date header of the current second, and that second


def _http_date() -> str:
    """The ``Date`` header CherryPy sends (``httputil.HTTPDate``), made once a second."""
    global _date  # a cache of one value, replaced whole
    second = int(time.time())
    if _date[0] != second:
        _date = (second, httputil.HTTPDate(second))
    return _date[1]


def _access(log: Any, environ: dict[str, Any], status: int, length: str, headers: dict[str, str]) -> None:
    """Write CherryPy's access line for a request :class:`Application` served itself.

    The format and escaping of ``LogManager.access``; :class:`_AccessExtra` adds the job to it.
    """
    query = environ.get("QUERY_STRING")
    atoms = {
        "h": environ.get("REMOTE_HOST") or environ.get("REMOTE_ADDR", ""),
        "l": "-",
        "u": environ.get("LOGON_USER") or environ.get("REMOTE_USER") or "-",
        "t": log.time(),
        "r": f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}{'?' + query if query else ''} "
        f"{environ.get('SERVER_PROTOCOL')}",
        "s": str(status),
        "b": length or "-",
        "f": headers.get("Referer", ""),
        "a": headers.get("User-Agent", ""),
        "o": headers.get("Host", "-"),
        "i": "-",
        "z": _cplogging.LazyRfc3339UtcTime(),
    }
    for key, value in atoms.items():
        text = value if isinstance(value, str) else str(value)
        atoms[key] = repr(text.replace('"', '\\"').encode("utf8"))[2:-1].replace("\\\\", "\\")
    log.access_log.info(log.access_log_format.format(**atoms))


class _AccessExtra(logging.Filter):
    """Puts the job a request made (``request.access_extra``) into its access line."""

    def filter(self, record: logging.LogRecord) -> bool:
        extra = getattr(cherrypy.serving.request, "access_extra", None)
        if extra:
            record.__dict__.update(extra)
        return True


def _error_page(status: str, message: str, traceback: str, version: str) -> str:
    """CherryPy's own errors (404, 405, ...) as JSON instead of an HTML page."""
    cherrypy.response.headers["Content-Type"] = JSON_TYPE
    code = int(status.split()[0])
    kind = {404: "not_found", 405: "method_not_allowed"}.get(code, "http_error")
    return json.dumps({"error": kind, "detail": message if code < 500 else "internal error"})


def create_app(
    settings: Settings,
    store: JobStore | None = None,
    make_downloader: Callable[[DownloadProgress], Downloader] | None = None,
    start_worker: bool = True,
) -> cherrypy.Application:
    """Build the WSGI application over the job store; ``app.service.close()`` stops it.

    Without a ``store`` one is opened from the settings (and its schema upgraded unless
    ``DOWNLOADER_DB_UPGRADE`` is off). With ``settings.workers`` above 0 and
    ``start_worker``, this process downloads too.
    """
    if settings.workers > 0 and start_worker:
        prepare_root(settings.root())  # before the store: a refused start touches nothing
    store = store or open_store(
        settings.database(),
        upgrade=settings.db_upgrade,
        # Every request thread and worker keeps its connection: an overflow connection is
        # closed on return, and opening one costs PostgreSQL a backend (18 a second measured).
        pool_size=settings.http_threads + settings.workers + 2,
        max_overflow=4,
    )
    make_downloader = make_downloader or downloader_factory(settings)
    worker: Worker | None = None
    if settings.workers > 0 and start_worker:
        worker = build_worker(store, settings, "serve", make_downloader)
        metrics = worker.metrics
    else:
        metrics = ServiceMetrics()
        metrics.watch_store(store.stats)
    if settings.notifications_url:
        metrics.watch_subscription(lambda: subscription.report(settings, store))
    service = Service(settings, store, make_downloader, metrics, worker)
    config = {
        "/": {
            "request.dispatch": cherrypy.dispatch.MethodDispatcher(),
            "request.process_request_body": False,
            "request.show_tracebacks": False,
            "error_page.default": _error_page,
            "tools.encode.on": False,
        }
    }
    app = Application(Root(service), script_name="", config=config)
    app.service = service
    app.log.screen = False  # access and error lines go to logging, which serve() configures
    app.log.access_log.addFilter(_AccessExtra())
    if worker is not None:
        try:
            worker.start()
        except BaseException:
            store.close()
            raise
    return app
