"""Commands for the people who run the service: ``serve``, ``worker``, ``db`` and ``jobs``.

``jobs`` and ``db`` work on the job store directly (the same settings as the service:
``DOWNLOADER_DATABASE_URL`` or the state directory), so they work while the service is down.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from ..errors import DownloaderError
from ..service.settings import Settings, describe, settings_from_env

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CONFLICT = 0, 1, 2, 3, 4


def add_operator_commands(commands: Any) -> None:
    """Add ``serve``, ``worker``, ``db`` and ``jobs`` to the command tree."""
    table = "\n".join(
        f"  {env:<28} {default or '(empty)':<32} {meaning}" for env, default, meaning in describe()
    )
    environment = f"environment (options win over it):\n{table}\n\n"
    serve = commands.add_parser(
        "serve",
        help="run the webhook service (intake, plus DOWNLOADER_WORKERS download workers)",
        description="Run the CloudEvents webhook: every event POSTed to / is stored as a job before the "
        "answer, then downloaded under the download root by this process's workers (and any "
        "`downloader-service worker` sharing the job store).",
        epilog=environment + "example:\n"
        "  CARTD_URL=http://cartd:8081 downloader-service serve --host 0.0.0.0 --port 8080",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help="address to listen on (DOWNLOADER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (DOWNLOADER_PORT, default 8080)")
    serve.add_argument("--cart-url", dest="cartd_url", help="Cartd's cart API URL (CARTD_URL)")
    serve.add_argument(
        "--download-root", help="where downloads go (DOWNLOADER_ROOT, default <state dir>/downloads)"
    )
    serve.add_argument("--workers", type=int, help="download workers in this process (DOWNLOADER_WORKERS)")
    serve.set_defaults(run=_serve)

    worker = commands.add_parser(
        "worker",
        help="run download workers only, over the shared job store",
        description="Claim jobs from the job store and download them; no HTTP intake. Run any number "
        "of these beside `serve` replicas over one PostgreSQL database and one download root.",
        epilog=environment + "example:\n"
        "  DOWNLOADER_DATABASE_URL=postgresql://downloader@db/downloader downloader-service worker",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    worker.add_argument("--workers", type=int, help="download threads (DOWNLOADER_WORKERS)")
    worker.add_argument("--cart-url", dest="cartd_url", help="Cartd's cart API URL (CARTD_URL)")
    worker.add_argument("--download-root", help="where downloads go (DOWNLOADER_ROOT)")
    worker.set_defaults(run=_worker)

    db = commands.add_parser(
        "db",
        help="the job store's schema",
        description="Upgrade or check the job store's schema (DOWNLOADER_DATABASE_URL, else SQLite in "
        "the state directory). `serve` and `worker` upgrade at start unless DOWNLOADER_DB_UPGRADE=false.",
    )
    db.add_argument("action", choices=["upgrade", "check"], help="upgrade to the newest schema, or check it")
    db.set_defaults(run=_db)

    jobs = commands.add_parser(
        "jobs",
        help="list, show, retry or delete download jobs",
        description="Look at the job store: what was downloaded, what failed and why.",
        epilog="examples:\n  downloader-service jobs list --state failed\n"
        "  downloader-service jobs show 3f2a...\n  downloader-service jobs retry 3f2a...\n\n"
        "exit codes: 0 done, 1 the store failed, 2 usage, 3 no such job, 4 the job's state forbids it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = jobs.add_subparsers(title="actions", metavar="ACTION", dest="action", required=True)
    listing = actions.add_parser("list", help="newest jobs first")
    listing.add_argument("--state", choices=["queued", "running", "done", "failed", "rejected"])
    listing.add_argument("--limit", type=int, default=50, help="how many (default: %(default)s)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    for name, text in (
        ("show", "one job as JSON: state, attempts, last error, download path"),
        ("retry", "queue a failed job again, with a fresh retry window"),
        ("delete", "remove a job's download and its record"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("job_id", metavar="JOB_ID")
    jobs.set_defaults(run=_jobs)


def _settings(args: argparse.Namespace) -> Settings | None:
    overrides = {
        name: getattr(args, name, None) for name in ("host", "port", "cartd_url", "download_root", "workers")
    }
    try:
        return settings_from_env(**overrides)
    except ValueError as exc:
        print(f"downloader-service: bad setting: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    from ..service.server import serve

    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    return _started(lambda: serve(settings))


def _worker(args: argparse.Namespace) -> int:
    from ..service.server import run_worker

    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    return _started(lambda: run_worker(settings))


def _started(run: Any) -> int:
    """Run a long-lived command; a problem at start is one line on stderr, not a traceback."""
    try:
        run()
    except DownloaderError as exc:
        print(f"downloader-service: cannot start: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # the port (check_listen), or the state directory
        print(f"downloader-service: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _db(args: argparse.Namespace) -> int:
    from ..service.store import open_store

    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    try:
        store = open_store(settings.database(), upgrade=args.action == "upgrade")
    except DownloaderError as exc:
        print(f"downloader-service: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{store.describe()}: schema revision {store.check()} (newest)")
    store.close()
    return EXIT_OK


def _jobs(args: argparse.Namespace) -> int:
    from ..service.store import open_store

    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    try:
        store = open_store(settings.database(), upgrade=False)
    except DownloaderError as exc:
        print(f"downloader-service: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        return _job_action(args, settings, store)
    except DownloaderError as exc:
        print(f"downloader-service: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        store.close()


def _job_action(args: argparse.Namespace, settings: Settings, store: Any) -> int:
    from ..service.worker import remove_download

    if args.action == "list":
        if args.limit < 1:
            print("downloader-service: --limit must be at least 1", file=sys.stderr)
            return EXIT_USAGE
        for job in store.list_jobs(args.state, args.limit):
            print(json.dumps(job.summary()) if args.json else _line(job.summary()))
        return EXIT_OK
    job = store.get(args.job_id)
    if job is None:
        print(f"downloader-service: no job {args.job_id!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.action == "show":
        print(json.dumps({**job.summary(), "event": job.event}, indent=2, ensure_ascii=False))
        return EXIT_OK
    if args.action == "retry":
        if job.state not in ("failed", "queued"):
            print(
                f"downloader-service: job {job.id} is {job.state}; only failed jobs are retried",
                file=sys.stderr,
            )
            return EXIT_CONFLICT
        print(_line(store.retry(job.id).summary()))
        return EXIT_OK
    if job.state == "running":
        print(f"downloader-service: job {job.id} is running; delete it when it has ended", file=sys.stderr)
        return EXIT_CONFLICT
    removed = remove_download(job, settings)
    store.delete(job.id)
    print(f"deleted {job.id}" + (f" and {job.download_path}" if removed and job.download_path else ""))
    return EXIT_OK


def _line(summary: dict[str, Any]) -> str:
    """One job as a line a person reads: id, state, attempts, when, event, what came of it."""
    when = datetime.fromisoformat(summary["created"]).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    outcome = (
        summary.get("download_path") or summary.get("error") or summary.get("last_error", {}).get("error", "")
    )
    return (
        f"{summary['job_id']}  {summary['state']:<8} {summary['attempts']:>3}  {when}  "
        f"{summary['event_id'][:30]:<30}  {outcome}"
    )
