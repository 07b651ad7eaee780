"""The ``downloader-service`` command: ``download`` for people, and the operators' commands.

``serve``, ``worker``, ``db`` and ``jobs`` live in :mod:`.operate`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final, TextIO

from .. import __version__
from ..cartapi import DEFAULT_CART_API_URL, DEFAULT_CART_TIMEOUT
from ..cartfile import CartFile
from ..cloudevent import CloudEvent
from ..downloader import Downloader, DownloadResult
from ..errors import (
    CartError,
    CartTimeoutError,
    DownloaderError,
    DownloadInterruptedError,
    IntegrityError,
    InvalidConfigError,
    InvalidInputError,
    LocalStorageError,
    PolicyUnavailableError,
    UnsafeArchiveError,
)
from ..progress import DownloadProgress
from ..transactioninfo import TransactionInfo, fetch_transaction_document, fetch_transaction_info
from .clientconfig import load_client_config
from .operate import add_operator_commands

LOGGER = logging.getLogger(__name__)

DEFAULT_POLICY_URL = "http://127.0.0.1:8181"
# How long the command waits for Cartd to delete the cart once the result is out.
DELETE_WAIT = 30.0

# Exit codes, documented in docs/operations.md and --help. The first matching class wins.
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_INVALID, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 3, 4, 5
EXIT_UNSAFE, EXIT_INTEGRITY, EXIT_INTERRUPTED, EXIT_STORAGE = 6, 7, 8, 9
EXIT_CONFIG = 10
EXIT_CANCELLED = 130
EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (InvalidConfigError, EXIT_CONFIG),
    (InvalidInputError, EXIT_INVALID),
    (CartTimeoutError, EXIT_TIMEOUT),
    (CartError, EXIT_UNAVAILABLE),
    (PolicyUnavailableError, EXIT_UNAVAILABLE),
    (UnsafeArchiveError, EXIT_UNSAFE),
    (IntegrityError, EXIT_INTEGRITY),
    (DownloadInterruptedError, EXIT_INTERRUPTED),
    (LocalStorageError, EXIT_STORAGE),
)
EXIT_HELP = f"""exit codes:
  {EXIT_OK}    the files are on disk and verified
  {EXIT_USAGE}    wrong command-line usage
  {EXIT_INVALID}    invalid input: the event or transaction file, or a field in it
  {EXIT_UNAVAILABLE}    Cartd (or Policy) failed the cart or could not be reached
  {EXIT_TIMEOUT}    the cart was not ready before --timeout
  {EXIT_UNSAFE}    the cart's tar held a member that was refused (link, device, '..', unrequested)
  {EXIT_INTEGRITY}    a file failed its checksum, or a requested file was missing
  {EXIT_INTERRUPTED}    the download broke off or stalled
  {EXIT_STORAGE}    the destination could not be written
  {EXIT_CONFIG}   the configuration cannot be used (pacifica-cli INI: a key, a CA or certificate file)
  {EXIT_CANCELLED}  interrupted by Ctrl-C (nothing half-written is left)
"""


PACIFICA_CLI_HELP = """pacifica-cli's form reads pacifica-cli's INI as pacifica-cli 0.5.2 does:
  defaults from $DOWNLOAD_URL, $DOWNLOAD_POLICY_URL, $AUTHENTICATION_TYPE, _USERNAME, _PASSWORD,
  _CERT, _KEY; then /etc/pacifica-cli/config.ini, else <sys.prefix>/pacifica-cli/config.ini, else
  ./config.ini; then --config-ini / $PACIFICA_CLI_INI (an absolute path, or a name under
  ~/.pacifica_cli; default config.ini). Keys: [endpoints] download_url (Cartd),
  download_policy_url (GET <it>/<ID>), ca_bundle (True, False or a CA file); [authentication]
  type = clientssl (cert, key), basic (username, password; $AUTHENTICATION_USERNAME and
  $AUTHENTICATION_PASSWORD win), gssapi (needs requests-gssapi) or None.

examples:
  downloader-service download --transaction-id 67 --destination ./here
  downloader-service --config-ini /etc/site/cli.ini download --cloudevent event.json --destination ./here
  downloader-service download event event.json ./here --cart-url http://cartd:8081

"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    code: int = args.run(args)
    return code


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree, with ``--help`` on every level."""
    parser = argparse.ArgumentParser(
        prog="downloader-service",
        description="Get data out of a Pacifica archive: run the CloudEvents webhook, or download by hand.",
        epilog="examples:\n  downloader-service serve --port 8080\n"
        "  downloader-service jobs list --state failed\n"
        "  downloader-service download event event.json ./here\n"
        "  downloader-service download transaction 67 ./here --policy-url http://policy:8181",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # pacifica-cli's global options, so that `pacifica-cli --config-ini X download ...` keeps working.
    parser.add_argument(
        "--config-ini",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="pacifica-cli's INI (see download --help)",
    )
    parser.add_argument(
        "--verbose",
        dest="log_level",
        default=argparse.SUPPRESS,
        metavar="LEVEL",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="log level of download, as pacifica-cli's --verbose (debug, info, ...)",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_download(commands)
    add_operator_commands(commands)
    return parser


# An option: its flags and add_argument's keywords. Tables of them are the download
# command's options, so each parser below is one call per table.
Option = tuple[tuple[str, ...], dict[str, Any]]
_DEST: Final[Option] = (
    ("dest",),
    {"metavar": "DEST", "type": Path, "help": "directory to download into (created if missing)"},
)


def _common_options() -> list[Option]:
    """Options of every form of ``download``."""
    return [
        (("--filename",), {"default": "data", "help": "directory under DEST for the files (default: data)"}),
        (
            ("--timeout",),
            {
                "type": float,
                "default": DEFAULT_CART_TIMEOUT,
                "help": "seconds to wait for the cart to be staged, plus 0.1 s a file and 1 s per 50 MB of "
                "the files' size (default: %(default)g)",
            },
        ),
        (("--json",), {"action": "store_true", "help": "print one JSON summary on stdout"}),
        (
            ("--keep-cart",),
            {
                "action": "store_true",
                "help": "leave the cart on Cartd (default: delete it once the files are in place; the "
                "result is printed first, the command waits up to 30 s for the delete)",
            },
        ),
        (("--quiet", "-q"), {"action": "store_true", "help": "no progress bar, no summary line"}),
        (("--verbose", "-v"), {"action": "store_true", "help": "log every step to stderr"}),
    ]


def _cartd_options() -> list[Option]:
    """Options of the KIND forms (pacifica-cli's form reads its INI instead)."""
    return [
        (
            ("--cart-url",),
            {
                "default": os.environ.get("CARTD_URL", DEFAULT_CART_API_URL),
                "help": "Cartd's cart API URL (default: $CARTD_URL or %(default)s)",
            },
        )
    ]


def _pacifica_cli_options() -> list[Option]:
    """pacifica-cli's ``download`` arguments."""
    return [
        (
            ("--config-ini",),
            {
                "default": argparse.SUPPRESS,
                "metavar": "FILE",
                "help": "pacifica-cli's INI file: an absolute path, or a name under ~/.pacifica_cli "
                "(default: $PACIFICA_CLI_INI, else config.ini)",
            },
        ),
        (
            ("--destination",),
            {"metavar": "DIR", "default": ".", "help": "download into DIR/<filename> (default: .)"},
        ),
    ]


def _transaction_options() -> list[Option]:
    """Where ``download transaction`` gets the transaction's file list."""
    return [
        (("transaction_id",), {"metavar": "ID", "help": "the transaction id"}),
        _DEST,
        (
            ("--policy-url",),
            {
                "default": os.environ.get("POLICY_URL", DEFAULT_POLICY_URL),
                "help": "Pacifica Policy's URL (default: $POLICY_URL or %(default)s)",
            },
        ),
        (
            ("--from-file",),
            {
                "type": Path,
                "metavar": "FILE",
                "help": "Policy's transaction document saved to a file "
                "(GET {policy}/status/transactions/by_id/ID), "
                'instead of asking Policy: {"files": {"<file id>": {"name": "foo.txt", "subdir": "a/b", '
                '"hashtype": "sha1", "hashsum": "...", "size": 123}, ...}}; if it names its transaction '
                "(_id or transaction_id), that must be ID",
            },
        ),
    ]


def _options(parser: argparse.ArgumentParser, *tables: list[Option]) -> argparse.ArgumentParser:
    for table in tables:
        for flags, spec in table:
            parser.add_argument(*flags, **spec)
    return parser


def _add_download(commands: Any) -> None:
    """``download`` in pacifica-cli's form, and its KINDs ``event`` and ``transaction``."""
    common = _options(argparse.ArgumentParser(add_help=False), _common_options())
    cartd = _options(argparse.ArgumentParser(add_help=False), _cartd_options())
    download = commands.add_parser(
        "download",
        parents=[common],
        help="download an event's or a transaction's files",
        description="Download the files of a CloudEvent or a Pacifica transaction, verified. "
        "As pacifica-cli: download (--transaction-id ID | --cloudevent FILE) --destination DIR, configured "
        "by pacifica-cli's INI; or with a KIND below, configured by options and the environment.",
        epilog=PACIFICA_CLI_HELP + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _options(download, _pacifica_cli_options())
    what = download.add_mutually_exclusive_group()
    what.add_argument("--transaction-id", metavar="ID", help="the files of transaction ID (asked of Policy)")
    what.add_argument("--cloudevent", metavar="FILE", help="the files a saved CloudEvent lists (- for stdin)")
    download.set_defaults(run=_download_pacifica_cli, parser=download)
    kinds = download.add_subparsers(title="or what to download (without the INI)", metavar="KIND")
    _add_event_kind(kinds, [common, cartd])
    _add_transaction_kind(kinds, [common, cartd])


def _add_event_kind(kinds: Any, parents: list[argparse.ArgumentParser]) -> None:
    event = kinds.add_parser(
        "event",
        parents=parents,
        help="the files a saved CloudEvent lists",
        description="Download the files listed in a saved CloudEvent (0.1 or 1.0 JSON).",
        epilog="examples:\n  downloader-service download event event.json ./here\n"
        "  curl -s http://notifier/last | downloader-service download event - ./here --json\n\n" + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    event_file: Option = (
        ("event_file",),
        {"metavar": "EVENT_FILE", "help": "the event's JSON file, or - for standard input"},
    )
    _options(event, [event_file, _DEST])
    event.set_defaults(run=_download_event)


def _add_transaction_kind(kinds: Any, parents: list[argparse.ArgumentParser]) -> None:
    transaction = kinds.add_parser(
        "transaction",
        parents=parents,
        help="the files of a Pacifica transaction",
        description="Download a transaction's files; the file list comes from Pacifica Policy "
        "(GET {policy}/status/transactions/by_id/ID) or from --from-file.",
        epilog="examples:\n  downloader-service download transaction 67 ./here --policy-url http://policy:8181\n"
        "  downloader-service download transaction 67 ./here --from-file transaction-67.json\n\n" + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _options(transaction, _transaction_options())
    transaction.set_defaults(run=_download_transaction)


def _download_pacifica_cli(args: argparse.Namespace) -> int:
    """pacifica-cli's ``download``: endpoints and credentials from its INI, the rest as ours."""
    if args.transaction_id is None and args.cloudevent is None:
        args.parser.print_usage(sys.stderr)
        print(
            "downloader-service download: give --transaction-id ID or --cloudevent FILE (pacifica-cli's "
            "form), or a KIND: event, transaction",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        config = load_client_config(getattr(args, "config_ini", None))
    except InvalidConfigError as exc:
        print(f"downloader-service: {exc}", file=sys.stderr)
        return exit_code(exc)
    args.dest = Path(args.destination)
    args.cart_url = config.download_url
    LOGGER.debug("configuration", extra={"files": config.files, "auth": config.auth_type})

    def files() -> tuple[Any, int | None]:
        if args.cloudevent is not None:
            cart_files = _read_json(args.cloudevent, "event", CloudEvent.read_files)
        else:
            doc = fetch_transaction_document(
                config.download_policy_url, args.transaction_id, **config.request_options
            )
            cart_files = TransactionInfo.files(doc)
        return cart_files, _total_size(cart_files)

    return _download(args, files, config.request_options)


def _download_event(args: argparse.Namespace) -> int:
    def files() -> tuple[Any, int | None]:
        # Read a window at a time, keeping only the files: never the text or the whole event.
        cart_files = _read_json(args.event_file, "event", CloudEvent.read_files)
        return cart_files, _total_size(cart_files)

    return _download(args, files)


def _download_transaction(args: argparse.Namespace) -> int:
    def files() -> tuple[Any, int | None]:
        if args.from_file is not None:
            doc = _read_json(str(args.from_file), "transaction info")
            _check_transaction_id(doc, args.transaction_id, args.from_file)
        else:
            doc = fetch_transaction_info(args.policy_url, args.transaction_id)
        cart_files = TransactionInfo.files(doc)
        return cart_files, _total_size(cart_files)

    return _download(args, files)


def _check_transaction_id(doc: Any, wanted: str, path: Path) -> None:
    """A saved document that names another transaction is the wrong file: refuse it."""
    if not isinstance(doc, dict):
        return
    for key in ("_id", "transaction_id"):
        named = doc.get(key)
        if isinstance(named, (str, int)) and str(named) != str(wanted):
            raise InvalidInputError(
                f"{path} is the document of transaction {named}, not {wanted}", field=key, path=str(path)
            )


def _total_size(files: Sequence[CartFile]) -> int | None:
    """The bytes to expect, when every file says a sane ``size`` (else the bar shows no total)."""
    total = 0
    for file in files:
        if file.size is None:
            return None
        total += file.size
    return total


def _read_json(source: str, what: str, read: Callable[[IO[bytes]], Any] = json.load) -> Any:
    """``read`` the JSON document of a file, or of standard input for ``-``."""
    name = "standard input" if source == "-" else source
    try:
        if source == "-":
            return read(sys.stdin.buffer)
        with open(source, "rb") as handle:
            return read(handle)
    except OSError as exc:
        raise InvalidInputError(
            f"cannot read the {what} file {source}: {exc.strerror}", field="file"
        ) from exc
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"the {what} file {name} is not UTF-8 text", field="file") from exc
    except ValueError as exc:
        raise InvalidInputError(f"the {what} in {name} is not valid JSON: {exc}", field="file") from exc


def _download(args: argparse.Namespace, files: Any, request_options: dict[str, Any] | None = None) -> int:
    level = logging.DEBUG if args.verbose else getattr(args, "log_level", "CRITICAL")
    logging.basicConfig(level=level, stream=sys.stderr)
    show = not args.quiet and sys.stderr.isatty()
    try:
        cart_files, total = files()
    except DownloaderError as exc:
        print(f"downloader-service: {exc}", file=sys.stderr)
        return exit_code(exc)
    progress = TerminalProgress(sys.stderr, total) if show else DownloadProgress()
    downloader = Downloader(
        args.dest,
        args.cart_url,
        cart_timeout=args.timeout,
        progress=progress,
        delete_cart=not args.keep_cart,
        auth=request_options,
    )
    try:
        result = downloader.download(cart_files, args.filename)
    except KeyboardInterrupt:
        _close(progress)
        print("downloader-service: interrupted; nothing half-written was left behind", file=sys.stderr)
        downloader.wait_for_deletes(DELETE_WAIT)
        return EXIT_CANCELLED
    except DownloaderError as exc:
        _close(progress)
        print(f"downloader-service: {exc}", file=sys.stderr)
        downloader.wait_for_deletes(DELETE_WAIT)
        return exit_code(exc)
    _close(progress)
    _report(result, args)  # the files are there: say so now, then let Cartd's delete finish
    sys.stdout.flush()
    if not downloader.wait_for_deletes(DELETE_WAIT):
        LOGGER.info(
            "the cart is still being deleted; Cartd will purge it", extra={"cart_url": result.cart_url}
        )
    return EXIT_OK


def exit_code(exc: Exception) -> int:
    """The documented exit code for an error."""
    return next((code for cls, code in EXIT_CODES if isinstance(exc, cls)), EXIT_ERROR)


def _report(result: DownloadResult, args: argparse.Namespace) -> None:
    if args.json:
        summary = {
            "destination": str(result.root.resolve()),
            "files": result.file_count,
            "already_there": result.skipped,
            "bytes": result.bytes,
            "seconds": round(result.seconds, 3),
            "cart_url": result.cart_url,
        }
        print(json.dumps(summary))
    elif not args.quiet:
        where = result.root.resolve()
        there = f" ({result.skipped} already there)" if result.skipped else ""
        print(f"{result.file_count} files{there}, {result.bytes} bytes in {result.seconds:.2f} s -> {where}")


def _close(progress: DownloadProgress) -> None:
    if isinstance(progress, TerminalProgress):
        progress.close()


class TerminalProgress(DownloadProgress):
    """A status line while Cartd stages the cart, then a tqdm byte bar naming the file.

    With ``total`` (the sum of the files' ``size``) the bar shows how far along it is and an ETA.
    """

    def __init__(self, stream: TextIO, total: int | None = None) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.stream = stream
        try:
            size = os.get_terminal_size(stream.fileno())
        except (OSError, ValueError):
            size = os.terminal_size((0, 0))
        # A terminal that reports no size (some ptys) would get no bar at all from tqdm.
        self.size = {"ncols": size.columns or 80, "nrows": size.lines or 24}
        self.files = 0
        self.total = total
        self.total_files = 0
        self.status: Any = None
        self.bar: Any = None

    def cart_created(self, cart_url: str, files: int) -> None:
        self.total_files = files
        self.status = self._tqdm(
            total=None,
            desc=f"staging cart ({files} files)",
            bar_format="{desc} {elapsed}",
            file=self.stream,
            **self.size,
        )

    def cart_status(self, status: str, message: str) -> None:
        if self.status is not None:
            text = f"cart {status or '...'}" + (f": {message}" if message else "")
            self.status.set_description_str(text[:70])
            self.status.update(0)

    def file_started(self, path: str, size: int) -> None:
        if self.status is not None:
            self.status.close()
            self.status = None
        if self.bar is None:
            self.bar = self._tqdm(
                total=self.total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.stream,
                miniters=1,
                **self.size,
            )
        self.files += 1
        self.bar.set_description_str(f"[{self.files}/{self.total_files}] {path}"[-60:])

    def file_advanced(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        """Close whatever bar is open."""
        for bar in (self.status, self.bar):
            if bar is not None:
                bar.close()
        self.status = self.bar = None


def run() -> None:
    """The console-script entry point."""
    sys.exit(main())
