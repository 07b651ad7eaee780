"""The jobs page: what a browser asking for ``GET /`` sees — recent jobs, with retry and delete.

Plain HTML rendered here from the job store, and one small script (``static/page.js``) whose
buttons call the job API (``POST /jobs/<id>/retry``, ``DELETE /jobs/<id>``) with ``fetch()``
and reload. Event ids, sources and error details are hostile input: every value goes through
:func:`html.escape`, the script reads only ``data-`` attributes and writes only text, and the
Content-Security-Policy runs no script and applies no style but the page's own (a fresh nonce
each answer) and lets it talk to nothing but this origin.

Auth is the job API's (:mod:`.auth`: the operators' credential, checked by the edge): basic
auth the browser remembers, or ``/?access_token=...`` with ``DOWNLOADER_ADMIN_TOKEN``, which the
page keeps in its links and the script sends on as ``Authorization: Bearer``.
"""

from __future__ import annotations

import functools
import html
import secrets
import time
from importlib import resources
from typing import Any, Final
from urllib.parse import urlencode

import cherrypy

from .. import __version__
from .jobs import Job, JobState
from .store import Gap, GapState, JobStore, StoreError
from .subscription import replay_command

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
        return 400, _document(nonce, f'<p class="error">{_text(message)}</p>', _nav({}, "", token))
    try:
        counts: dict[str, int] = store.stats()["jobs"]
        jobs = store.list_jobs(state or None, PAGE_SIZE)
        gaps = store.gaps(GapState.OPEN) if guarded else []
    except StoreError as exc:
        message = f"the job store is unavailable: {exc}"
        return 503, _document(nonce, f'<p class="error">{_text(message)}</p>', "")
    return 200, _document(nonce, _gaps(gaps) + _table(jobs, token, state), _nav(counts, state, token))


def _gaps(gaps: list[Gap]) -> str:
    """A banner per open gap: when Notifications routed nothing here, and the line that replays it."""
    if not gaps:
        return ""
    items = []
    for gap in gaps:
        until = f"until {gap.enabled_at}" if gap.enabled_at else "and is still off"
        command = replay_command(gap)
        replay = (
            f'<pre class="replay"><code>{_text(command)}</code></pre>'
            if command
            else "<p>It is not routing here yet: the replay command appears once it is enabled again.</p>"
        )
        error = f" Notifications' error: <q>{_text(_short(gap.error))}</q>." if gap.error else ""
        items.append(
            f'<li id="gap-{_text(gap.id)}"><p>The subscription was <b>{_text(gap.kind)}</b> from '
            f"{_text(gap.disabled_at)} {_text(until)} (Notifications' clock).{error} Events routed in "
            f"that window did not arrive; replay them (events already here are not downloaded again):</p>"
            f"{replay}<p>Or, to forget it: <code>downloader-service subscription dismiss "
            f"{_text(gap.id)}</code></p></li>"
        )
    return f'<section class="gaps" role="alert"><h2>Missed events</h2><ul>{"".join(items)}</ul></section>'


def _document(nonce: str, main: str, nav: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Pacifica downloader: jobs</title>
<style nonce="{nonce}">{_asset("page.css")}</style>
</head>
<body>
<h1>Pacifica downloader: jobs</h1>
{nav}
<p id="status" role="status"></p>
{main}
<footer>pacifica-downloader-service {_text(__version__)}; times in UTC;
the newest {PAGE_SIZE} jobs are shown (all of them: <code>GET /jobs</code>).</footer>
<script nonce="{nonce}">{_asset("page.js")}</script>
</body>
</html>
"""


def _nav(counts: dict[str, int], current: str, token: str) -> str:
    """Links to every state's jobs, with their counts."""
    total = sum(counts.values())
    links = [_nav_link("all", total if counts else None, "", current, token)]
    links += [_nav_link(state, counts.get(state), state, current, token) for state in tuple(JobState)]
    return f"<nav>{''.join(links)}</nav>"


def _nav_link(label: str, count: int | None, state: str, current: str, token: str) -> str:
    href = _href("", token, state=state)
    text = label if count is None else f"{label} ({count})"
    mark = ' class="current" aria-current="page"' if state == current else ""
    return f'<a href="{_text(href)}"{mark}>{_text(text)}</a>'


def _table(jobs: list[Job], token: str, state: str) -> str:
    if not jobs:
        return f"<p>No {_text(state) + ' ' if state else ''}jobs.</p>"
    head = "".join(f"<th>{name}</th>" for name in _TEXT_COLUMNS)
    head += "".join(f'<th class="num">{name}</th>' for name in _NUMBER_COLUMNS)
    head += "<th>download path or error</th><th>actions</th>"
    rows = "\n".join(_row(job, token) for job in jobs)
    return f'<table id="jobs">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>'


def _row(job: Job, token: str) -> str:
    """One job: every value escaped; the buttons carry only URLs the script calls."""
    summary = job.summary()
    files = summary.get("files", summary.get("file_count"))
    cells = [
        f'<td class="state state-{_text(job.state)}">{_text(job.state)}</td>',
        f'<td class="event">{_text(job.event_id)}{_conflicts(job)}</td>',
        f'<td class="source">{_text(job.source)}</td>',
        f'<td class="created">{_text(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job.created_at)))}</td>',
        f'<td class="num">{job.attempts}</td>',
        f'<td class="num">{_number(files)}</td>',
        f'<td class="num">{_number(summary.get("bytes"))}</td>',
        f'<td class="num">{_seconds(summary.get("seconds"))}</td>',
        f'<td class="outcome">{_outcome(job, summary)}</td>',
        f'<td class="actions">{_actions(job, token)}</td>',
    ]
    return f'<tr id="job-{_text(job.id)}" data-state="{_text(job.state)}">{"".join(cells)}</tr>'


def _conflicts(job: Job) -> str:
    """A mark on an event whose id came again with another body (that body was not fetched)."""
    if not job.conflicts:
        return ""
    title = "this source and id came again with another body, which was not downloaded"
    return f' <span class="conflict" title="{_text(title)}">({job.conflicts} conflicting)</span>'


def _outcome(job: Job, summary: dict[str, Any]) -> str:
    """Where a done job's files are, or what went wrong (shortened; all of it in the title)."""
    if job.download_path is not None:
        # A job done on a retry still records the error of the attempt before.
        removed = " (removed)" if job.removed_at is not None else ""
        return f"<code>{_text(job.download_path)}</code>{removed}"
    if job.error is not None:
        prefix = "last attempt: " if job.state == JobState.QUEUED else ""
        when = f" (next attempt {summary['next_attempt']})" if "next_attempt" in summary else ""
        detail = job.error.detail
        return (
            f'<span class="error" title="{_text(detail)}">{_text(prefix)}<b>{_text(job.error.kind)}</b>: '
            f"{_text(_short(detail))}{_text(when)}</span>"
        )
    return ""


def _actions(job: Job, token: str) -> str:
    """A link to the job's JSON; Retry for failed jobs; Delete for all but running ones."""
    path = f"jobs/{job.id}"
    parts = [f'<a href="{_text(_href(path, token))}">JSON</a>']
    if job.state == JobState.FAILED:
        parts.append(_button("Retry", "POST", f"{path}/retry", ""))
    if job.state != JobState.RUNNING:
        confirm = f"Delete job {job.id} and its download?"
        parts.append(_button("Delete", "DELETE", path, confirm))
    return " ".join(parts)


def _button(label: str, method: str, url: str, confirm: str) -> str:
    ask = f' data-confirm="{_text(confirm)}"' if confirm else ""
    return (
        f'<button type="button" class="{label.lower()}" data-method="{method}" '
        f'data-url="{_text(url)}"{ask}>{label}</button>'
    )


def _href(path: str, token: str, **query: str) -> str:
    """A link relative to the page, keeping the access token the page was opened with."""
    values = {key: value for key, value in query.items() if value}
    if token:
        values["access_token"] = token
    return f"{path or './'}?{urlencode(values)}" if values else (path or "./")


def _param(params: dict[str, Any], name: str) -> str:
    value = params.get(name, "")
    return value if isinstance(value, str) else ""


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


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
