"""The jobs page: what a browser asking for ``GET /`` sees — recent jobs, with retry and delete.

HTML from a Jinja2 template (``templates/page.html``) filled from the job store, and one
small script (``static/page.js``) whose buttons call the job API (``POST /jobs/<id>/retry``,
``DELETE /jobs/<id>``) with ``fetch()`` and reload. Event ids, sources and error details are
hostile input: the template escapes every value (autoescape on; only our own CSS and script
are marked safe), the script reads only ``data-`` attributes and writes only text, and the
Content-Security-Policy runs no script and applies no style but the page's own (a fresh nonce
each answer) and lets it talk to nothing but this origin.

Auth is the job API's (:mod:`.auth`: the operators' credential, checked by the edge): basic
auth the browser remembers, or ``/?access_token=...`` with ``DOWNLOADER_ADMIN_TOKEN``, which the
page keeps in its links and the script sends on as ``Authorization: Bearer``.
"""

from __future__ import annotations

import functools
import secrets
import time
from importlib import resources
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode

import cherrypy

from .. import __version__
from .jobs import Job, JobState
from .store import Gap, GapState, JobStore, StoreError
from .subscription import replay_command

if TYPE_CHECKING:
    import jinja2

HTML_TYPE: Final = "text/html; charset=utf-8"
PAGE_SIZE: Final = 50  # the newest jobs shown; /jobs pages on past them
DETAIL_MAX: Final = 200  # characters of an error's detail shown in the table (all in its title)
# Media types a browser asks for when it wants a page, and what API clients ask for.
_HTML_TYPES: Final = ("text/html", "application/xhtml+xml")
_JSON_TYPE: Final = "application/json"
_TEXT_COLUMNS: Final = ("state", "event id", "source", "created (UTC)")
_NUMBER_COLUMNS: Final = ("attempts", "files", "bytes", "seconds")


def wants_html(accept: str) -> bool:
    """Whether an ``Accept`` header prefers a page to JSON (a tie, or no header, is JSON)."""
    ranges = _parse_accept(accept)
    html_q = max(_quality(ranges, media_type) for media_type in _HTML_TYPES)
    return html_q > _quality(ranges, _JSON_TYPE)


def respond(store: JobStore, params: dict[str, Any], guarded: bool = False) -> bytes:
    """The page for ``GET /`` (the caller has checked auth), its status and headers set.

    ``guarded``: the service guards a Notifications subscription, so its open gaps are shown.
    """
    nonce = secrets.token_urlsafe(18)
    headers = cherrypy.response.headers
    headers["Content-Type"] = HTML_TYPE
    headers["Content-Security-Policy"] = content_security_policy(nonce)
    # The access token may be in the URL: keep it out of Referer headers and caches.
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cache-Control"] = "no-store"
    headers["X-Content-Type-Options"] = "nosniff"
    status, page = render(store, params, nonce, guarded)
    cherrypy.response.status = status
    return page.encode()


def content_security_policy(nonce: str) -> str:
    """Only the page's own script and style run; ``fetch()`` reaches only this origin."""
    return "; ".join(
        (
            "default-src 'none'",
            f"script-src 'nonce-{nonce}'",
            f"style-src 'nonce-{nonce}'",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def render(store: JobStore, params: dict[str, Any], nonce: str, guarded: bool = False) -> tuple[int, str]:
    """The status and HTML of the page: gaps, counts by state, then the newest jobs (of ``?state=``)."""
    token = _param(params, "access_token")
    state = _param(params, "state")
    if state and state not in tuple(JobState):
        message = f"state must be one of {', '.join(tuple(JobState))}, not {state!r}"
        return 400, _page(nonce, error=message, nav=_nav({}, "", token))
    try:
        counts: dict[str, int] = store.stats()["jobs"]
        jobs = store.list_jobs(state or None, PAGE_SIZE)
        gaps = store.gaps(GapState.OPEN) if guarded else []
    except StoreError as exc:
        return 503, _page(nonce, error=f"the job store is unavailable: {exc}")
    return 200, _page(
        nonce,
        nav=_nav(counts, state, token),
        gaps=[_gap(gap) for gap in gaps],
        jobs=[_row(job, token) for job in jobs],
        state=state,
    )


def _page(nonce: str, **values: Any) -> str:
    """The template filled in: values are escaped by the template engine, not by hand."""
    return _template().render(
        nonce=nonce,
        css=_asset("page.css"),
        js=_asset("page.js"),
        version=__version__,
        page_size=PAGE_SIZE,
        text_columns=_TEXT_COLUMNS,
        number_columns=_NUMBER_COLUMNS,
        **{"nav": None, "gaps": [], "jobs": None, "error": "", "state": "", **values},
    )


@functools.cache
def _template() -> jinja2.Template:
    """``templates/page.html`` (package data), with autoescape on for every value.

    Jinja2 is imported here, when the page is first asked for: ~6 MB a process that never
    serves it (a worker, a replica behind another's page) does not hold.
    """
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader(__package__, "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,  # a name the template misspells is an error, not ""
    )
    return env.get_template("page.html")


def _gap(gap: Gap) -> dict[str, Any]:
    """A banner per open gap: when Notifications routed nothing here, and the line that replays it."""
    return {
        "id": gap.id,
        "kind": gap.kind,
        "disabled_at": gap.disabled_at,
        "until": f"until {gap.enabled_at}" if gap.enabled_at else "and is still off",
        "error": _short(gap.error) if gap.error else "",
        "command": replay_command(gap),
    }


def _nav(counts: dict[str, int], current: str, token: str) -> list[dict[str, Any]]:
    """Links to every state's jobs, with their counts."""
    total = sum(counts.values())
    links = [_nav_link("all", total if counts else None, "", current, token)]
    links += [_nav_link(state, counts.get(state), state, current, token) for state in tuple(JobState)]
    return links


def _nav_link(label: str, count: int | None, state: str, current: str, token: str) -> dict[str, Any]:
    text = label if count is None else f"{label} ({count})"
    return {"href": _href("", token, state=state), "text": text, "current": state == current}


def _row(job: Job, token: str) -> dict[str, Any]:
    """One job's cells; the buttons carry only URLs the script calls."""
    summary = job.summary()
    path = f"jobs/{job.id}"
    return {
        "id": job.id,
        "state": job.state,
        "event_id": job.event_id,
        "conflicts": job.conflicts,
        "source": job.source,
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job.created_at)),
        "attempts": job.attempts,
        "files": _number(summary.get("files", summary.get("file_count"))),
        "bytes": _number(summary.get("bytes")),
        "seconds": _seconds(summary.get("seconds")),
        # A job done on a retry still records the error of the attempt before: the path wins.
        "download_path": job.download_path,
        "removed": job.removed_at is not None,
        "error": _error(job, summary) if job.download_path is None else None,
        "json_href": _href(path, token),
        "retry_url": f"{path}/retry" if job.state == JobState.FAILED else "",
        "delete_url": path if job.state != JobState.RUNNING else "",
    }


def _error(job: Job, summary: dict[str, Any]) -> dict[str, str] | None:
    """What went wrong (shortened; all of it in the title)."""
    if job.error is None:
        return None
    return {
        "prefix": "last attempt: " if job.state == JobState.QUEUED else "",
        "kind": job.error.kind,
        "detail": job.error.detail,
        "short": _short(job.error.detail),
        "when": f" (next attempt {summary['next_attempt']})" if "next_attempt" in summary else "",
    }


def _href(path: str, token: str, **query: str) -> str:
    """A link relative to the page, keeping the access token the page was opened with."""
    values = {key: value for key, value in query.items() if value}
    if token:
        values["access_token"] = token
    return f"{path or './'}?{urlencode(values)}" if values else (path or "./")


def _param(params: dict[str, Any], name: str) -> str:
    value = params.get(name, "")
    return value if isinstance(value, str) else ""


def _short(text: str) -> str:
    return text if len(text) <= DETAIL_MAX else text[: DETAIL_MAX - 1] + "…"


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else ""


def _seconds(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else ""


@functools.cache
def _asset(name: str) -> str:
    """A file of ``static/`` (read once; package data, so it ships with the wheel)."""
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def _parse_accept(accept: str) -> list[tuple[str, float]]:
    """``Accept`` as ``(media range, q)`` pairs; a malformed q counts as 0."""
    ranges = []
    for item in accept.split(","):
        media_range, *options = (part.strip() for part in item.split(";"))
        if not media_range:
            continue
        quality = 1.0
        for option in options:
            name, _, value = option.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranges.append((media_range.lower(), quality))
    return ranges


def _quality(ranges: list[tuple[str, float]], media_type: str) -> float:
    """The q of the most specific range matching ``media_type`` (0 when none does)."""
    major = media_type.split("/")[0]
    best, specificity = 0.0, -1
    for media_range, quality in ranges:
        rank = {media_type: 2, f"{major}/*": 1, "*/*": 0}.get(media_range, -1)
        if rank > specificity:
            best, specificity = quality, rank
    return best
