"""The Downloader: files in (an event or a transaction), a verified directory tree out."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .archive import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_RESUMES,
    ExtractResult,
    PathList,
    check_destination,
    extract_cart,
)
from .cartapi import DEFAULT_CART_TIMEOUT, CartAPI
from .cartfile import CartFile, as_yield_files
from .cloudevent import CloudEvent
from .errors import DownloaderError
from .progress import DownloadProgress
from .transactioninfo import TransactionInfo

LOGGER = logging.getLogger(__name__)

DEFAULT_TIMEOUT_PER_FILE = 0.1
DEFAULT_TIMEOUT_RATE = 50e6  # bytes a second
# bundle="auto" asks Cartd for a bundled cart when the files' known sizes add up to this.
# A bundle is served as a static file, read 1.6-2.5x as fast as the tar Cartd builds on the
# fly, and only a bundle can resume a broken download, but Cartd writes all of it before
# `ready`: benchmarks/bundle.py measured bundles 14-15 % faster at 64-256 MiB and even from
# about 500 MiB (benchmarks/README.md).
DEFAULT_BUNDLE_THRESHOLD = 64 << 20


@dataclass(frozen=True)
class DownloadResult:
    """What one download did. ``root`` is ``location/filename``, where the files are."""

    location: Path
    root: Path
    files: Sequence[Path]  # in the order asked for; a PathList made of the names it holds
    bytes: int
    cart_url: str
    seconds: float
    staging_seconds: float = field(default=0.0)
    # Files that were at the target already with the right checksum, so not asked of Cartd.
    skipped: int = field(default=0)

    @property
    def file_count(self) -> int:
        """How many files are in place (written now, or found there already and verified)."""
        return len(self.files)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (paths as strings)."""
        summary = {item.name: getattr(self, item.name) for item in fields(self)}
        summary.update(
            location=str(self.location),
            root=str(self.root),
            files=[str(path) for path in self.files],
            file_count=self.file_count,
        )
        return summary


class Downloader:
    """Download the files of a CloudEvent or a transaction through a Cartd cart.

    ``location`` is the directory the files land in (created if missing): a file ``a/b.txt``
    of a download with ``filename='data'`` ends up at ``location/data/a/b.txt``.
    ``cart_api_url`` is Cartd's cart endpoint. Keyword arguments:

    ``cart_timeout``, ``cart_timeout_per_file``, ``cart_timeout_rate``
        how long to wait for the cart to be staged, scaled to the cart (see
        :meth:`staging_timeout`): 120 s, plus 0.1 s a file, plus a second per 50 MB of the
        files' ``size``; ``cart_timeout_per_file=0, cart_timeout_rate=0`` makes it fixed;
    ``delete_cart``
        delete the cart on Cartd once the download ends: ``True`` (the default) in the
        background, so that the result does not wait on Cartd (its DELETE revokes three
        Celery tasks per file: seconds for thousands of files) -- :meth:`wait_for_deletes`
        waits for it; ``"wait"`` before returning; ``False`` never;
    ``progress``
        a :class:`DownloadProgress` to notify;
    ``chunk_size``
        bytes read and written at a time (64 KiB);
    ``skip_present``
        files already at the target with the right checksum are not asked of Cartd again
        (True): a re-run fetches only what is missing or changed;
    ``bundle``
        ask Cartd for a bundled cart, written as one tar and served as a static file (faster,
        and a broken download resumes with a ``Range`` request): ``"auto"`` (the default)
        when the files' known ``size`` adds up to ``bundle_threshold`` (64 MiB) or more,
        ``True`` always, ``False`` never;
    ``max_resumes``
        how many times a bundled cart's broken stream is asked again from where the verified
        data ends (5) before the interruption is the error;

    and every :class:`CartAPI` keyword (``session``, ``auth``, ``connect_timeout``,
    ``read_timeout``, ``poll_interval``, ``poll_max_interval``, ``clock``, ``sleep``).

    The 0.4.1 call style, ``Downloader(cart_api_url)`` and ``cloudevent(location, event)``,
    works too.
    """

    #: The cart client this downloader makes (the drop-in ``pacifica.downloader`` uses its own).
    cart_api_class: type[CartAPI] = CartAPI

    def __init__(
        self, location: str | os.PathLike[str] | None = None, cart_api_url: str | None = None, **kwargs: Any
    ) -> None:
        if cart_api_url is None and isinstance(location, str) and "://" in location:
            location, cart_api_url = None, location  # 0.4.1: Downloader(cart_api_url)
        self.location = Path(location) if location is not None else None
        self.cart_timeout = float(kwargs.pop("cart_timeout", DEFAULT_CART_TIMEOUT))
        self.cart_timeout_per_file = float(kwargs.pop("cart_timeout_per_file", DEFAULT_TIMEOUT_PER_FILE))
        self.cart_timeout_rate = float(kwargs.pop("cart_timeout_rate", DEFAULT_TIMEOUT_RATE))
        delete_cart = kwargs.pop("delete_cart", True)
        self.delete_cart: bool | str = delete_cart if delete_cart == "wait" else bool(delete_cart)
        self._deletions: list[threading.Thread] = []
        self._deletions_lock = threading.Lock()
        self.progress: DownloadProgress = kwargs.pop("progress", None) or DownloadProgress()
        self.chunk_size = int(kwargs.pop("chunk_size", DEFAULT_CHUNK_SIZE))
        self.skip_present = bool(kwargs.pop("skip_present", True))
        bundle = kwargs.pop("bundle", "auto")
        if bundle not in ("auto", True, False):
            raise ValueError(f"bundle must be 'auto', True or False, not {bundle!r}")
        self.bundle: bool | str = bundle
        self.bundle_threshold = int(kwargs.pop("bundle_threshold", DEFAULT_BUNDLE_THRESHOLD))
        self.max_resumes = int(kwargs.pop("max_resumes", DEFAULT_MAX_RESUMES))
        self.clock = kwargs.get("clock", time.monotonic)
        self.cart_api = self.cart_api_class(cart_api_url, **kwargs)

    @property
    def auth(self) -> dict[str, Any]:
        """The request keyword arguments sent with every call (upstream's ``auth``)."""
        return self.cart_api.auth

    def cloudevent(self, cloudevent: Any, filename: Any = "data", location: Any = None) -> DownloadResult:
        """Download the files a Pacifica Notifications CloudEvent (a dict) lists."""
        event, filename, location = _legacy_call(cloudevent, filename, location)
        return self.download(CloudEvent.files(event), filename, location)

    def transactioninfo(self, transinfo: Any, filename: Any = "data", location: Any = None) -> DownloadResult:
        """Download the files of a Policy transaction-info document (a dict)."""
        transinfo, filename, location = _legacy_call(transinfo, filename, location)
        return self.download(TransactionInfo.files(transinfo), filename, location)

    def download(
        self,
        files: Sequence[CartFile],
        filename: str = "data",
        location: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
    ) -> DownloadResult:
        """Cart, wait, stream and verify ``files``; on failure nothing new stays on disk.

        ``timeout`` is a fixed wait for staging, in seconds, instead of :meth:`staging_timeout`.
        """
        target = self._location(location)
        check_destination(target, filename, files)  # before the cart: Cartd's work would be lost
        started = self.clock()
        present = present_files(target / filename, files) if self.skip_present else {}
        wanted = [file for file in files if file.path not in present] if present else files
        if not wanted:
            LOGGER.info("every file is there already", extra={"files": len(files)})
            return DownloadResult(
                location=target,
                root=target / filename,
                files=_in_order(files, target / filename, present),
                bytes=0,
                cart_url="",
                seconds=self.clock() - started,
                skipped=len(present),
            )
        cart_url, extracted, ready = self._through_cart(wanted, filename, target, timeout)
        result = DownloadResult(
            location=target,
            root=extracted.root,
            files=_in_order(files, extracted.root, {*extracted.files.names, *present}),
            bytes=extracted.bytes,
            cart_url=cart_url,
            seconds=self.clock() - started,
            staging_seconds=ready - started,
            skipped=len(present),
        )
        LOGGER.info(
            "download finished",
            extra={
                "cart_url": cart_url,
                "files": result.file_count,
                "bytes": result.bytes,
                "seconds": round(result.seconds, 4),
            },
        )
        return result

    def _through_cart(
        self, wanted: Sequence[CartFile], filename: str, target: Path, timeout: float | None
    ) -> tuple[str, ExtractResult, float]:
        """Make a cart of ``wanted``, wait for it, stream it in; the cart is deleted whatever happens.

        Returns the cart's URL, what was extracted, and when the cart was ready (``clock``).
        """
        bundle = self.wants_bundle(wanted)
        planned = self.cart_api.new_cart_url()
        self.progress.cart_planned(planned)
        cart_url = self.cart_api.setup_cart(as_yield_files(wanted), bundle=bundle, cart_url=planned)
        self.progress.cart_created(cart_url, len(wanted))
        try:
            wait = self.staging_timeout(wanted) if timeout is None else timeout
            self.cart_api.wait_for_cart(cart_url, wait, self.progress.cart_status)
            ready = self.clock()
            extracted = self._fetch_cart(cart_url, filename, wanted, target, bundle)
        except DownloaderError as exc:
            LOGGER.warning(
                "download failed",
                extra={"cart_url": cart_url, "error": type(exc).__name__, "detail": str(exc)},
            )
            raise
        finally:
            self._delete(cart_url)
        return cart_url, extracted, ready

    def wants_bundle(self, files: Sequence[CartFile]) -> bool:
        """Whether to ask Cartd for a bundled cart of ``files`` (see ``bundle``)."""
        if self.bundle != "auto":
            return bool(self.bundle)
        return sum(file.size or 0 for file in files) >= self.bundle_threshold

    def staging_timeout(self, files: Sequence[CartFile]) -> float:
        """How long Cartd may take to stage these files before the cart counts as stuck.

        ``cart_timeout + cart_timeout_per_file * files + bytes / cart_timeout_rate``: Cartd
        stages a file in 40-75 ms here (2000 small files took up to 154 s, past a fixed 120 s)
        and copies data from the archive at hundreds of MB/s; the allowance is about twice
        that, so a cart still staging is not abandoned early, and one that is stuck (Cartd
        sometimes leaves a cart staging for ever) is recognised after a time that fits it.
        """
        allowance = self.cart_timeout + self.cart_timeout_per_file * len(files)
        if self.cart_timeout_rate > 0:
            allowance += sum(file.size or 0 for file in files) / self.cart_timeout_rate
        return allowance

    def _delete(self, cart_url: str) -> None:
        if not self.delete_cart:
            return
        if self.delete_cart == "wait":
            self.cart_api.delete_cart(cart_url)
            return
        thread = threading.Thread(
            target=self.cart_api.delete_cart, args=(cart_url,), name="delete-cart", daemon=True
        )
        thread.start()
        with self._deletions_lock:
            self._deletions = [*(t for t in self._deletions if t.is_alive()), thread]

    def wait_for_deletes(self, timeout: float | None = None) -> bool:
        """Wait until the carts being deleted in the background are; ``True`` if none is left.

        A process that exits without waiting leaves those carts to Cartd's own purge.
        """
        deadline = None if timeout is None else self.clock() + timeout
        with self._deletions_lock:
            pending = list(self._deletions)
        for thread in pending:
            thread.join(None if deadline is None else max(0.0, deadline - self.clock()))
        with self._deletions_lock:
            self._deletions = [t for t in self._deletions if t.is_alive()]
            return not self._deletions

    def _download_from_url(
        self,
        cart_url: str,
        filename: str,
        files: Sequence[CartFile] | None = None,
        location: str | os.PathLike[str] | None = None,
        bundle: bool = False,
    ) -> ExtractResult:
        """Stream a ready cart into ``location/filename``.

        With ``files`` the tar must hold exactly those files, each matching its checksum.
        Without (the upstream call) any regular files under ``filename/`` are taken, unverified;
        links, devices and paths escaping the target are refused all the same.

        A ``bundle``'s top directory is the cart's uid (placed as ``filename``), and if its
        server serves byte ranges a broken stream resumes where the verified data ends.
        """
        return self._fetch_cart(cart_url, filename, files, self._location(location), bundle)

    def _fetch_cart(
        self, cart_url: str, filename: str, files: Sequence[CartFile] | None, target: Path, bundle: bool
    ) -> ExtractResult:
        """Stream the ready cart into ``target/filename`` (what :meth:`_download_from_url` does)."""
        with self.cart_api.open_cart(cart_url, filename) as stream:
            if not bundle:
                return extract_cart(stream, target, filename, files, self.progress, self.chunk_size)
            resume = partial(self.cart_api.open_cart, cart_url, filename) if stream.resumable else None
            return extract_cart(
                stream,
                target,
                filename,
                files,
                self.progress,
                self.chunk_size,
                top=cart_uid(cart_url),
                resume=resume,
                max_resumes=self.max_resumes,
            )

    def _location(self, location: str | os.PathLike[str] | None) -> Path:
        if location is not None:
            return Path(location)
        if self.location is None:
            raise TypeError("no location: pass Downloader(location, ...) or location=...")
        return self.location


def cart_uid(cart_url: str) -> str:
    """The cart's uid: the last segment of its URL (a bundle's top directory)."""
    return urlsplit(cart_url).path.rstrip("/").rpartition("/")[2]


def _in_order(files: Sequence[CartFile], root: Path, placed: Collection[str]) -> PathList:
    """The paths of the files ``placed`` (paths below ``root``), in the order they were asked for."""
    return PathList(root, [file.path for file in files if file.path in placed])


def present_files(root: Path, files: Sequence[CartFile]) -> dict[str, Path]:
    """The files already at ``root`` (``location/filename``) with the right checksum, by path.

    Only regular files reached without a symbolic link count; a ``size`` that differs rules a
    file out before it is read. Anything else is downloaded again (and a changed file kept
    beside the new one, as the commit does).
    """
    found: dict[str, Path] = {}
    if not os.path.isdir(root):
        return found  # a first download: nothing to look at, file by file
    real_root = os.path.realpath(root)
    for file in files:
        path = root / file.path
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode) or os.path.realpath(path) != os.path.join(real_root, file.path):
            continue
        if file.size is not None and info.st_size != file.size:
            continue
        digest = hashlib.new(file.hashtype)
        try:
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except OSError:
            continue
        if digest.hexdigest() == file.hashsum:
            found[file.path] = path
    return found


def _legacy_call(document: Any, filename: Any, location: Any) -> tuple[Mapping[str, Any], str, Any]:
    """Map 0.4.1's ``method(location, document, filename)`` onto ours, by argument type."""
    if isinstance(document, (str, os.PathLike)) and isinstance(filename, Mapping):
        return filename, location if location is not None else "data", document
    return document, filename, location
