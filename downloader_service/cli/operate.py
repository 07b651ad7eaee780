"""Commands for the people who run the service: ``serve``, ``worker``, ``db``, ``jobs``, ``subscribe``.

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
# subscribe: Notifications could not be asked (down, 5xx: try again) / refused us (4xx: fix the settings).
EXIT_UNREACHABLE, EXIT_REFUSED = 5, 6


def add_operator_commands(commands: Any) -> None:
    """Add ``serve``, ``worker``, ``db``, ``jobs``, ``subscribe`` and ``subscription``."""
    table = "\n".join(
        f"  {env:<28} {default or '(empty)':<32} {meaning}" for env, default, meaning in describe()
    )
    environment = f"environment (options win over it):\n{table}\n\n"
    _add_serve(commands, environment)
    _add_worker(commands, environment)
    _add_db(commands)
    _add_jobs(commands)
    _add_subscription_commands(commands)


def _add_serve(commands: Any, environment: str) -> None:
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


def _add_worker(commands: Any, environment: str) -> None:
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


def _add_db(commands: Any) -> None:
    db = commands.add_parser(
        "db",
        help="the job store's schema",
        description="Upgrade or check the job store's schema (DOWNLOADER_DATABASE_URL, else SQLite in "
        "the state directory). `serve` and `worker` upgrade at start unless DOWNLOADER_DB_UPGRADE=false.",
    )
    db.add_argument("action", choices=["upgrade", "check"], help="upgrade to the newest schema, or check it")
    db.set_defaults(run=_db)


def _add_jobs(commands: Any) -> None:
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
        ("retry", "queue a failed job again with a fresh retry window, or run a queued one now"),
        ("delete", "remove a job's download and its record"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("job_id", metavar="JOB_ID")
    _add_import(actions)
    jobs.set_defaults(run=_jobs)


def _add_import(actions: Any) -> None:
    importer = actions.add_parser(
        "import",
        help="replay events (e.g. what Notifications logged while our subscription was disabled)",
        description="Put events through the same intake as POST /: a JSON array, JSON lines, or the "
        "text `pacifica-notifications-cmd eventget` prints. Only events the subscription's JSONPath "
        "(DOWNLOADER_SUBSCRIPTION_JSONPATH) matches are taken, and with --policy-url only those Policy "
        "allows; an event already known (same source and id) is not downloaded again.",
        epilog="example (the replay command /health/ready and the jobs page show for a gap):\n"
        "  pacifica-notifications-cmd eventget --start-date '2026-12-07 10:00:00' \\\n"
        "      --end-date '2026-12-07 10:20:00' --limit 1000000 \\\n"
        "    | downloader-service jobs import --gap 3f2a... -\n\n"
        "prints 'N new, M already known, K skipped, R rejected'; exit codes: 0 every event handled, "
        "1 the store or Policy failed for some (run it again: nothing is imported twice), 2 usage, "
        "3 no such gap",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    importer.add_argument(
        "file", nargs="?", default="-", metavar="FILE", help="the events (default -: stdin)"
    )
    importer.add_argument(
        "--gap", action="append", default=[], metavar="GAP_ID", help="mark this gap replayed (repeatable)"
    )
    importer.add_argument(
        "--window",
        nargs=2,
        metavar=("START", "END"),
        help="the window the input covers, as given to eventget ('Y-m-d H:M:S', Notifications' clock): "
        "every open gap inside it is marked replayed",
    )
    importer.add_argument(
        "--policy-url", default="", help="ask Pacifica Policy (POST /events/<user>) before each event"
    )
    importer.add_argument("--user", help="the user Policy is asked for (DOWNLOADER_NOTIFICATIONS_USER)")
    importer.add_argument("--jsonpath", help="the rule events must match (DOWNLOADER_SUBSCRIPTION_JSONPATH)")
    importer.add_argument("--json", action="store_true", help="the counts as one JSON object")


def _add_subscription_commands(commands: Any) -> None:
    subscribe = commands.add_parser(
        "subscribe",
        help="create, update and enable the service's Notifications subscription",
        description="Make the subscription of DOWNLOADER_NOTIFICATIONS_USER whose target is "
        "DOWNLOADER_PUBLIC_URL exist, match the settings (name, JSONPath, the service's own credentials "
        "as its auth) and be enabled; a disabled one is recorded as a gap first. Idempotent: one "
        "subscription per user and target. `serve` does the same every DOWNLOADER_SUBSCRIPTION_CHECK "
        "seconds. Prints the subscription as JSON (credentials left out).",
        epilog="exit codes: 0 done, 1 the job store failed, 2 bad settings, 5 Notifications could not be "
        "reached or answered 5xx (try again), 6 Notifications refused (check the user, the user header "
        "and the credentials in DOWNLOADER_NOTIFICATIONS_URL)",
    )
    subscribe.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep trying this long while Notifications cannot be reached (default: %(default)s)",
    )
    subscribe.set_defaults(run=_subscribe)
    subscription = commands.add_parser(
        "subscription",
        help="the subscription's state and its gaps (windows Notifications routed us nothing)",
        description="`status`: what the last check saw and every open gap with the command that "
        "replays it. `dismiss GAP_ID`: close a gap without replaying it.",
    )
    actions = subscription.add_subparsers(title="actions", metavar="ACTION", dest="action", required=True)
    actions.add_parser("status", help="the subscription's state and open gaps, as JSON")
    dismiss = actions.add_parser("dismiss", help="close a gap without replaying it")
    dismiss.add_argument("gap_id", metavar="GAP_ID")
    dismiss.add_argument("--note", default="", help="why (kept with the gap)")
    subscription.set_defaults(run=_subscription)


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
    from ..service.worker import run_worker  # no CherryPy: a worker process serves no HTTP

    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    return _started(lambda: run_worker(settings))


def _open_store(settings: Settings, upgrade: bool) -> Any:
    """The job store the settings name, or None after one line on stderr saying why not."""
    from ..service.store import open_store

    try:
        return open_store(settings.database(), upgrade=upgrade)
    except DownloaderError as exc:
        print(f"downloader-service: {exc}", file=sys.stderr)
        return None


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
    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    store = _open_store(settings, upgrade=args.action == "upgrade")
    if store is None:
        return EXIT_ERROR
    print(f"{store.describe()}: schema revision {store.check()} (newest)")
    store.close()
    return EXIT_OK


def _jobs(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    # Only import writes jobs: it may make the store (before the service ever ran).
    store = _open_store(settings, upgrade=args.action == "import" and settings.db_upgrade)
    if store is None:
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

    if args.action == "import":
        return _import(args, settings, store)
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
        from ..service.jobs import dumps  # a lone surrogate in the event must not break stdout

        print(dumps({**job.summary(), "event": job.event}, indent=2))
        return EXIT_OK
    if args.action == "retry":
        if job.state not in ("failed", "queued"):
            print(
                f"downloader-service: job {job.id} is {job.state}; only failed or queued jobs are retried",
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


def _import(args: argparse.Namespace, settings: Settings, store: Any) -> int:
    from ..service.intake import Intake
    from ..service.metrics import ServiceMetrics
    from ..service.replay import Replayer, read_events
    from ..service.store import GapState

    gaps = {gap.id: gap for gap in store.gaps(GapState.OPEN)}
    unknown = [gap_id for gap_id in args.gap if gap_id not in gaps]
    if unknown:
        print(f"downloader-service: no open gap {unknown[0]!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    try:
        replayer = Replayer(
            Intake(settings, store, ServiceMetrics()),
            args.jsonpath or settings.subscription_jsonpath,
            args.policy_url,
            args.user or settings.notifications_user,
        )
        window = _window(args.window)
    except ValueError as exc:
        print(f"downloader-service: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.policy_url and not replayer.user:
        print(
            "downloader-service: --policy-url needs --user (or DOWNLOADER_NOTIFICATIONS_USER)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    source: Any = sys.stdin.fileno() if args.file == "-" else args.file
    try:
        # surrogateescape: bytes that are not UTF-8 reach the intake as they came, and are refused there.
        with open(source, encoding="utf-8", errors="surrogateescape", closefd=args.file != "-") as stream:
            result = replayer.replay(read_events(stream))
    except OSError as exc:
        print(f"downloader-service: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    for problem in result.problems:
        print(f"downloader-service: {problem}", file=sys.stderr)
    replayed = []
    if not result.failed:
        covered = set(args.gap)
        if window is not None:
            covered |= {gap.id for gap in gaps.values() if _inside(gap, window)}
        note = f"jobs import: {result.line()}"
        replayed = [gap_id for gap_id in sorted(covered) if store.close_gap(gap_id, GapState.REPLAYED, note)]
    if args.json:
        print(json.dumps({**result.as_json(), "gaps_replayed": replayed}))
    else:
        print(result.line() + (f"; gaps replayed: {', '.join(replayed)}" if replayed else ""))
    return EXIT_ERROR if result.failed else EXIT_OK


def _window(window: list[str] | None) -> tuple[datetime, datetime] | None:
    if window is None:
        return None
    try:
        start, end = (datetime.strptime(value, "%Y-%m-%d %H:%M:%S") for value in window)
    except ValueError as exc:
        raise ValueError(f"--window takes two times as 'Y-m-d H:M:S': {exc}") from exc
    if start > end:
        raise ValueError("--window: the start is after the end")
    return start, end


def _inside(gap: Any, window: tuple[datetime, datetime]) -> bool:
    if gap.window_end is None:
        return False  # still disabled: its window has no end yet
    start = datetime.strptime(gap.window_start, "%Y-%m-%d %H:%M:%S")
    end = datetime.strptime(gap.window_end, "%Y-%m-%d %H:%M:%S")
    return window[0] <= start and end <= window[1]


def _subscribe(args: argparse.Namespace) -> int:
    import time

    from ..service.subscription import (
        NotificationsClient,
        NotificationsError,
        NotificationsRefusedError,
        ensure,
        replay_command,
    )

    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    if not settings.notifications_url:
        print(
            "downloader-service: set DOWNLOADER_NOTIFICATIONS_URL (and _USER, DOWNLOADER_PUBLIC_URL)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    store = _open_store(settings, upgrade=settings.db_upgrade)
    if store is None:
        return EXIT_ERROR
    client = NotificationsClient.from_settings(settings)
    deadline = time.monotonic() + max(0.0, args.wait)
    try:
        while True:
            try:
                outcome = ensure(client, store, settings)
                break
            except NotificationsRefusedError as exc:
                print(f"downloader-service: {exc}", file=sys.stderr)
                return EXIT_REFUSED
            except NotificationsError as exc:
                if time.monotonic() >= deadline:
                    print(f"downloader-service: {exc}", file=sys.stderr)
                    return EXIT_UNREACHABLE
                print(f"downloader-service: waiting for Notifications: {exc}", file=sys.stderr)
                time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    except DownloaderError as exc:
        print(f"downloader-service: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        store.close()
    if outcome.gap is not None:
        print(
            f"downloader-service: the subscription had been {outcome.gap.kind} since "
            f"{outcome.gap.disabled_at}; replay what it missed with:\n  {replay_command(outcome.gap)}",
            file=sys.stderr,
        )
    print(json.dumps({**outcome.subscription.public(), "action": outcome.action}, ensure_ascii=False))
    return EXIT_OK


def _subscription(args: argparse.Namespace) -> int:
    from ..service.store import GapState
    from ..service.subscription import gap_summary, report

    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    store = _open_store(settings, upgrade=False)
    if store is None:
        return EXIT_ERROR
    try:
        if args.action == "status":
            print(json.dumps(report(settings, store), indent=2, ensure_ascii=False))
            return EXIT_OK
        gap = store.close_gap(args.gap_id, GapState.DISMISSED, args.note or "dismissed by an operator")
        if gap is None:
            print(f"downloader-service: no gap {args.gap_id!r}", file=sys.stderr)
            return EXIT_NOT_FOUND
        print(json.dumps(gap_summary(gap), ensure_ascii=False))
        return EXIT_OK
    except DownloaderError as exc:
        print(f"downloader-service: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        store.close()
