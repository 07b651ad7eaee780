"""The Cartd protocol: create a cart, poll it until staged, stream its tar, delete it.

Every request goes through one ``requests.Session`` with a connect and read timeout, and every
``requests``/``urllib3`` exception is translated here, once, into :mod:`.errors`.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import requests
import urllib3.exceptions
import urllib3.response

from .cartfile import CartFile, YieldFiles, validated_files
from .errors import (
    CartError,
    CartFailedError,
    CartGoneError,
    CartTimeoutError,
    CartUnavailableError,
    DownloadInterruptedError,
)

LOGGER = logging.getLogger(__name__)

DEFAULT_CART_API_URL = "http://127.0.0.1:8081"
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_CART_TIMEOUT = 120.0
# Cartd stages a small cart in a fraction of a second: polling starts every 20 ms so the
# download begins within tens of milliseconds of "ready". Later the pause grows with the time
# already waited (2 % of it), so noticing "ready" late never costs more than 2 % of the staging
# time, and at most 0.25 s: at upstream's 1 s a ready cart of 2000 small files waited 0.5 s
# on average, longer than its transfer. A HEAD is a small read of Cartd's database; a cart
# staging for a minute costs ~370 of them.
DEFAULT_POLL_INTERVAL = 0.02
DEFAULT_POLL_MAX_INTERVAL = 0.25
POLL_FRACTION = 0.02
# Request keyword arguments that upstream's ``auth`` dict may carry into every call.
_REQUEST_KWARGS = frozenset({"auth", "cert", "verify", "headers", "proxies", "cookies"})
_MESSAGE_LIMIT = 1000


class CartAPI:
    """A client for one Cartd endpoint (the upstream ``pacifica.downloader.CartAPI``).

    ``cart_api_url`` is where carts are created (``{cart_api_url}/{uid}``); without it the
    ``CARTD_URL`` environment variable, then ``http://127.0.0.1:8081``. Keyword arguments:

    ``session``
        a ``requests.Session`` to use (a new one by default);
    ``auth``
        upstream's dict of request keyword arguments (``{"auth": ("user", "pw"),
        "verify": "/ca.pem"}``), or a requests auth object or ``(user, password)`` tuple;
    ``connect_timeout``, ``read_timeout``
        seconds for each HTTP call (5 and 60);
    ``poll_interval``, ``poll_max_interval``
        shortest and longest pause between status polls (0.02 s and 0.25 s; in between, 2 %
        of the time waited so far);
    ``clock``, ``sleep``
        replace ``time.monotonic`` and ``time.sleep`` (for tests).
    """

    def __init__(self, cart_api_url: str | None = None, **kwargs: Any) -> None:
        url = cart_api_url or os.environ.get("CARTD_URL") or DEFAULT_CART_API_URL
        self.cart_api_url = url.rstrip("/")
        self.session: requests.Session = kwargs.pop("session", None) or requests.Session()
        self.request_kwargs = _request_kwargs(kwargs.pop("auth", None))
        self.timeout = (
            float(kwargs.pop("connect_timeout", DEFAULT_CONNECT_TIMEOUT)),
            float(kwargs.pop("read_timeout", DEFAULT_READ_TIMEOUT)),
        )
        self.poll_interval = float(kwargs.pop("poll_interval", DEFAULT_POLL_INTERVAL))
        self.poll_max_interval = float(kwargs.pop("poll_max_interval", DEFAULT_POLL_MAX_INTERVAL))
        self.clock: Callable[[], float] = kwargs.pop("clock", time.monotonic)
        self.sleep: Callable[[float], None] = kwargs.pop("sleep", time.sleep)
        if kwargs:
            raise TypeError(f"CartAPI got unexpected keyword arguments: {sorted(kwargs)}")

    @property
    def auth(self) -> dict[str, Any]:
        """The request keyword arguments sent with every call (upstream's ``auth``)."""
        return self.request_kwargs

    def setup_cart(self, yield_files: YieldFiles, bundle: bool = False, cart_url: str | None = None) -> str:
        """Create a cart of the files ``yield_files()`` yields and return the cart's URL.

        ``bundle=True`` asks Cartd to write the cart as one tar before it is ready: it is then
        served as a static file (faster, with ``Content-Length`` and byte ranges, so a broken
        download can resume), and its top directory is the cart's uid, not ``filename``.
        ``cart_url`` (from :meth:`new_cart_url`) lets a caller record the URL before the cart
        exists, so that a process dying mid-POST leaves nothing it cannot find again.
        """
        files = validated_files(yield_files)
        count = len(files)
        cart_url = cart_url or self.new_cart_url()
        body = _CartDocument(files, bundle)
        with self._request("POST", cart_url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if resp.status_code not in (200, 201, 202):
                _raise_for_status(resp, cart_url, f"creating the cart ({count} files)")
        LOGGER.info("cart created", extra={"cart_url": cart_url, "files": count, "bundle": bundle})
        return cart_url

    def new_cart_url(self) -> str:
        """A URL for a new cart (the client chooses the uid: a uuid4, as upstream)."""
        return f"{self.cart_api_url}/{uuid.uuid4()}"

    def cart_status(self, cart_url: str) -> tuple[int, str, str]:
        """Ask Cartd once: ``(HTTP status, X-Pacifica-Status, X-Pacifica-Message)``."""
        with self._request("HEAD", cart_url) as resp:
            return (
                resp.status_code,
                resp.headers.get("X-Pacifica-Status", ""),
                resp.headers.get("X-Pacifica-Message", ""),
            )

    def wait_for_cart(
        self,
        cart_url: str,
        timeout: float = DEFAULT_CART_TIMEOUT,
        on_status: Callable[[str, str], None] | None = None,
    ) -> str:
        """Poll until the cart is ready and return ``cart_url``; ``timeout`` is in seconds.

        Raises :class:`CartFailedError` when Cartd reports an error, :class:`CartTimeoutError`
        when the deadline passes first. ``on_status(status, message)`` sees every poll.
        """
        started = self.clock()
        deadline = started + timeout
        while True:
            code, status, message = self.cart_status(cart_url)
            message = clean_cartd_message(message)
            if on_status is not None:
                on_status(status, message)
            if code == 204 and status == "ready":
                return cart_url
            # 4xx: Cartd or a proxy before it refuses (a TLS terminator wanting a client
            # certificate answers 400); only a 408 or a 429 is worth asking again.
            if 400 <= code < 500 and code not in (408, 429):
                raise (CartGoneError if code == 404 else CartFailedError)(
                    f"Cartd answered {code} for the cart {cart_url}: {message or 'no message'}",
                    url=cart_url,
                    status=code,
                    cartd_message=message,
                )
            if code == 500 or status == "error":
                raise CartFailedError(
                    f"Cartd failed the cart {cart_url}: {message or 'no message'}",
                    url=cart_url,
                    status=code,
                    cartd_message=message,
                )
            now = self.clock()
            remaining = deadline - now
            if remaining <= 0:
                raise CartTimeoutError(
                    f"the cart {cart_url} was not ready within {timeout:g} s "
                    f"(last status {status or code!r}: {message or 'no message'})",
                    url=cart_url,
                    timeout=timeout,
                    cartd_status=status,
                )
            interval = min(max((now - started) * POLL_FRACTION, self.poll_interval), self.poll_max_interval)
            self.sleep(min(interval, remaining))

    @contextmanager
    def open_cart(self, cart_url: str, filename: str = "data", offset: int = 0) -> Iterator[CartStream]:
        """Start the GET of a ready cart and yield its body as a file-like stream.

        With ``offset`` the body is asked from that byte on (``Range: bytes=<offset>-``); the
        stream's ``start`` says where it really starts: ``offset`` for a 206 whose
        ``Content-Range`` matches, 0 for a server that ignored the range and sent it all.
        """
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        resp = self._request("GET", cart_url, params={"filename": filename}, stream=True, headers=headers)
        with resp:
            if resp.status_code not in ((200, 206) if offset > 0 else (200,)):
                _raise_for_status(resp, cart_url, "downloading the cart")
            start = _range_start(resp, cart_url, offset) if resp.status_code == 206 else 0
            # Cartd sends a plain tar; a proxy may still gzip it on the way.
            resp.raw.decode_content = True
            yield CartStream(resp.raw, cart_url, start=start, length=_body_length(resp))

    def delete_cart(self, cart_url: str) -> bool:
        """Delete the cart on Cartd; return whether that worked (failure is only logged)."""
        try:
            with self._request("DELETE", cart_url) as resp:
                deleted = resp.status_code < 300
        except CartUnavailableError:
            deleted = False
        if not deleted:
            LOGGER.warning("could not delete cart", extra={"cart_url": cart_url})
        return deleted

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        merged = {**self.request_kwargs, **kwargs}
        if "headers" in self.request_kwargs and "headers" in kwargs:
            merged["headers"] = {**self.request_kwargs["headers"], **kwargs["headers"]}
        try:
            return self.session.request(method, url, timeout=self.timeout, **merged)
        except OSError as exc:
            if isinstance(exc, requests.RequestException):
                raise self._unavailable(method, url, exc) from exc
            # requests reports a CA bundle or client certificate it cannot find so, before
            # connecting (tls.tls_options checks them earlier, where a caller uses it).
            raise CartUnavailableError(
                f"cannot reach Cartd for {method} {url}: {exc}", url=url, retryable=False
            ) from exc

    def _unavailable(self, method: str, url: str, exc: requests.RequestException) -> CartUnavailableError:
        """The sentence says what happened; urllib3's own words go to the debug log."""
        LOGGER.debug("Cartd request failed", extra={"url": url, "method": method, "raw": str(exc)[:4000]})
        if isinstance(exc, requests.Timeout):
            return CartUnavailableError(f"Cartd did not answer {method} {url} in time", url=url)
        return CartUnavailableError(
            f"cannot reach Cartd for {method} {url}: {connection_problem(exc)}", url=url
        )


class CartStream:
    """The body of a cart download, read in chunks; stream failures become our errors.

    ``start`` is the offset in the cart's tar of the first byte of this body (not 0 after a
    ``Range`` request was honoured); ``length`` is the body's announced length, if any, and
    a body that ends before it is an interruption. ``resumable`` says whether the server
    serves byte ranges of this body (a bundled cart, served as a static file).
    """

    def __init__(self, raw: Any, url: str, start: int = 0, length: int | None = None) -> None:
        self._raw = raw
        self.url = url
        self.start = start
        self.length = length
        self.bytes_read = 0

    @property
    def resumable(self) -> bool:
        """Whether a broken download of this body can go on with a ``Range`` request."""
        headers = getattr(self._raw, "headers", None) or {}
        return (
            self.length is not None
            and headers.get("Accept-Ranges", "").strip().lower() == "bytes"
            and headers.get("Content-Encoding", "identity").strip().lower() == "identity"
        )

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes; ``b""`` at the end of the body."""
        try:
            data: bytes = self._raw.read(size)
        except _STREAM_ERRORS as exc:
            raise self._broken(exc) from exc
        self._count(len(data), size != 0)
        return data

    def readinto(self, buffer: memoryview) -> int:
        """Read into ``buffer``; 0 at the end of the body.

        The body goes straight from the socket into ``buffer`` through http.client's
        ``readinto`` when nothing needs decoding (Cartd never compresses): urllib3's ``read``
        would make two copies of every chunk on the way.
        """
        direct = self._direct()
        try:
            if direct is not None:
                count: int = direct.readinto(buffer)
            else:
                data = self._raw.read(len(buffer))
                count = len(data)
                buffer[:count] = data
        except _STREAM_ERRORS as exc:
            raise self._broken(exc) from exc
        self._count(count, len(buffer) != 0)
        return count

    def _direct(self) -> Any:
        """http.client's response under urllib3's, when reading it directly skips nothing.

        Only for urllib3's own response class: a wrapper around it (a test's fault injection,
        a proxy library) is read through its ``read``.
        """
        if type(self._raw) is not urllib3.response.HTTPResponse:
            return None
        fp = getattr(self._raw, "_fp", None)
        headers = getattr(self._raw, "headers", None) or {}
        encoding = headers.get("Content-Encoding", "identity").strip().lower()
        buffered = getattr(self._raw, "_decoded_buffer", None)
        if fp is None or not hasattr(fp, "readinto") or encoding != "identity":
            return None
        return fp if buffered is not None and not len(buffered) else None

    def _count(self, count: int, asked: bool) -> None:
        if not count and asked and self.length is not None and self.bytes_read < self.length:
            raise DownloadInterruptedError(
                f"the download of {self.url} ended after {self.bytes_read} of {self.length} bytes",
                url=self.url,
                bytes_read=self.bytes_read,
            )
        self.bytes_read += count

    def _broken(self, exc: BaseException) -> DownloadInterruptedError:
        LOGGER.debug("cart stream failed", extra={"url": self.url, "raw": str(exc)[:4000]})
        return DownloadInterruptedError(
            f"the download of {self.url} broke off after {self.bytes_read} bytes: {connection_problem(exc)}",
            url=self.url,
            bytes_read=self.bytes_read,
        )


class _CartDocument:
    """The POST body ``{"fileids": [...], "bundle": true}``, encoded as it is sent.

    requests sends an iterable that has a length as it comes, with that ``Content-Length``:
    the body is encoded a batch of files at a time twice (once to count its bytes), and never
    held whole: for 76,000 files it would be 8 MB next to the files themselves.
    """

    def __init__(self, files: Sequence[CartFile], bundle: bool) -> None:
        self.files = files
        self.bundle = bundle
        self.length = sum(map(len, self))

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        yield b'{"fileids": ['
        for start in range(0, len(self.files), _BATCH):
            batch = [file.as_cartd() for file in self.files[start : start + _BATCH]]
            yield (b", " if start else b"") + json.dumps(batch)[1:-1].encode()
        yield b'], "bundle": true}' if self.bundle else b"]}"  # without the key Cartd applies its setting


_BATCH = 1000
_STREAM_ERRORS = (urllib3.exceptions.HTTPError, requests.RequestException, http.client.HTTPException, OSError)


def _body_length(resp: requests.Response) -> int | None:
    """The ``Content-Length`` of an identity-encoded body, or None."""
    if resp.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return None
    try:
        length = int(resp.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return length if length >= 0 else None


def _range_start(resp: requests.Response, url: str, offset: int) -> int:
    """Check a 206 answers the range asked for (``bytes <offset>-<end>/<total>``)."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
    if match is None or int(match[1]) != offset or int(match[2]) < offset:
        raise DownloadInterruptedError(
            f"Cartd answered the range from byte {offset} of {url} with "
            f"{resp.headers.get('Content-Range', 'no Content-Range')!r}",
            url=url,
            bytes_read=0,
        )
    return offset


def _request_kwargs(auth: Any) -> dict[str, Any]:
    """Accept upstream's dict of request kwargs as well as a plain requests ``auth``."""
    if auth is None:
        return {}
    if isinstance(auth, Mapping):
        unknown = set(auth) - _REQUEST_KWARGS
        if unknown:
            raise TypeError(f"auth may carry only {sorted(_REQUEST_KWARGS)}, not {sorted(unknown)}")
        return dict(auth)
    return {"auth": auth}


def connection_problem(exc: BaseException) -> str:
    """What went wrong with a connection, in a few words, from an exception and its causes."""
    text = repr(exc)
    verify = re.search(r"certificate verify failed: ([^()'\"]+)", text)
    if verify:
        return f"the server's TLS certificate is not trusted ({verify[1].strip()})"
    for needles, words in _PROBLEMS:
        if any(needle in text for needle in needles):
            return words
    return f"{type(exc).__name__}"


_PROBLEMS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("CERTIFICATE_REQUIRED", "certificate required"), "the server requires a client certificate"),
    (
        ("UNKNOWN_CA", "unknown ca", "BAD_CERTIFICATE", "bad certificate", "CERTIFICATE_EXPIRED"),
        "the server refused our client certificate",
    ),
    (("WRONG_VERSION_NUMBER",), "no TLS at the other end (an https:// URL for an http:// server?)"),
    (("SSLError", "SSL:"), "the TLS handshake failed"),
    (("Connection refused", "Errno 111"), "connection refused"),
    (
        ("Name or service not known", "Temporary failure in name resolution", "Errno -2", "Errno -3"),
        "host name not resolved",
    ),
    (("timed out", "Timeout"), "no answer in time"),
    (("Connection reset", "Errno 104"), "connection reset"),
    (
        ("IncompleteRead", "Connection broken", "RemoteDisconnected", "closed connection"),
        "the connection closed early",
    ),
    (("No route to host", "Network is unreachable"), "network unreachable"),
)


def clean_cartd_message(message: str) -> str:
    """Cartd's message as one sentence: a traceback it carries becomes its exception line.

    Cartd passes on what the archive interface answered, Python traceback included; the whole
    message goes to the debug log, the error keeps its head and the exception at its end.
    """
    if "Traceback" not in message:
        return _shorten(message)
    LOGGER.debug("Cartd message", extra={"raw": message[:20000]})
    head = re.split(r"\(|\{|Traceback", message, maxsplit=1)[0].strip(" :")
    unescaped = message.replace("\\\\n", "\n").replace("\\n", "\n").replace('\\"', '"')
    tail = unescaped.split("Traceback (most recent call last):")[-1]
    lines = [line.strip().strip('"\\') for line in tail.splitlines() if line.strip()]
    exceptions = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", line)]
    cause = exceptions[-1] if exceptions else ""
    cause = re.sub(r"\"[,}].*$", "", cause)[:300]
    return f"{head}: {cause}" if head and cause else (head or cause or _shorten(message))


def _raise_for_status(resp: requests.Response, url: str, doing: str) -> None:
    message = clean_cartd_message(resp.headers.get("X-Pacifica-Message") or _body_message(resp))
    text = f"Cartd answered {resp.status_code} {resp.reason} {doing} at {url}: {message}"
    error: type[CartError] = CartFailedError
    if resp.status_code >= 500:
        error = CartUnavailableError
    elif resp.status_code == 404 and not doing.startswith("creating"):
        error = CartGoneError  # a cart Cartd purged (LRU) between our calls
    raise error(text, url=url, status=resp.status_code, cartd_message=message)


def _shorten(message: str) -> str:
    """Cartd can put a whole traceback in its message; keep errors and logs readable."""
    return message if len(message) <= _MESSAGE_LIMIT else message[: _MESSAGE_LIMIT - 1] + "…"


def _body_message(resp: requests.Response) -> str:
    """The ``message`` of an error body, reading no more than a few kilobytes of it."""
    try:
        head = next(resp.iter_content(_MESSAGE_LIMIT * 8), b"")
    except requests.RequestException:
        return "no message"
    text = head.decode("utf-8", "replace") if isinstance(head, bytes) else str(head)
    try:
        body = json.loads(text)
    except ValueError:
        # An HTML error page (a proxy's, nginx's "400 No required SSL certificate was sent"):
        # its title says it in one line.
        return html_title(text) or text or "no message"
    if isinstance(body, Mapping) and "message" in body:
        return str(body["message"])
    return text


def html_title(text: str) -> str | None:
    """The ``<title>`` of an HTML page (a proxy's error page says what went wrong there), or None."""
    title = re.search(r"<title>\s*([^<]{1,300}?)\s*</title>", text, re.IGNORECASE)
    return title[1] if title else None
