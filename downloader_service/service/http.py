"""The HTTP server: CherryPy's cheroot, strict about message framing and unmoved by slow clients.

Framing: one parser (:func:`parse_fields`) reads every request's header fields, for the gate
below and for cheroot's request alike, so the two cannot disagree on a request's length. Two
``Content-Length``, ``Transfer-Encoding`` or ``Host`` fields, a ``Content-Length`` that is not a
number of bytes, ``Content-Length`` beside ``Transfer-Encoding`` (request smuggling),
whitespace between a field's name and its colon, folded lines and bare LF line ends are refused
``400`` as soon as the head has arrived, and the connection is closed. A body the application
leaves unread closes the connection too. Every answer cheroot gives itself (400, 408, 413,
500, ...) is JSON, like the application's.

Slow clients: cheroot hands a connection to a pool thread as soon as it is accepted, and the
thread then waits for the request for as long as bytes keep trickling in, so a few dozen slow
clients stop the service. Here a connection waits in cheroot's selector, without a thread,
until its whole request head and the first :data:`BODY_PREBUFFER` bytes of its body have
arrived (the *gate*). A request must arrive within ``request_timeout`` seconds of its first
byte (``408`` after, also for the rest of a larger body, read by a thread) and a connection
may stay silent for at most ``idle_timeout`` seconds (cheroot's socket timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from typing import TYPE_CHECKING, Any, Final, Literal

from cheroot import errors
from cheroot.makefile import MakeFile, StreamReader, StreamWriter
from cheroot.server import HeaderReader, HTTPConnection, HTTPRequest
from cherrypy._cpwsgi_server import CPWSGIServer

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# cheroot's limit on the request line and headers (CherryPy's default is 500 KB): a head
# this big holds no legitimate request, and the gate buffers at most this much of it.
HEAD_LIMIT: Final = 64 * 1024
# How much of a body the gate waits for before a thread takes the request: an event from
# Pacifica Notifications fits; a larger body's rest is read by the thread, by the deadline.
BODY_PREBUFFER: Final = 64 * 1024
_RECV_SIZE: Final = 64 * 1024
# An answer is sent in one write when it ends (head and body together), or as soon as this
# much of it is waiting.
HOLD_LIMIT: Final = 64 * 1024
# Unread body bytes cheroot may read and drop to keep a connection open; above, it is closed.
DRAIN_LIMIT: Final = 64 * 1024
# How long, and how much, a connection closed on an unread body still reads (and drops).
LINGER_SECONDS: Final = 2.0
LINGER_BYTES: Final = 16 * 1024 * 1024
_END_OF_HEAD: Final = b"\r\n\r\n"
# A line feed without its carriage return: RFC 9112 wants CRLF, and a head that never has a
# CRLF CRLF would otherwise wait for its deadline.
_BARE_LF = re.compile(rb"(?<!\r)\n")
_KINDS: Final = {
    400: "bad_request",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
    505: "http_version_not_supported",
}
Verdict = Literal["ready", "wait", "late", "gone", "bad"]


# Field names are tokens (RFC 9110 5.6.2).
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Duplicated fields that change what a request is: two values leave it ambiguous.
_SINGLE: Final = frozenset({b"Content-Length", b"Host", b"Transfer-Encoding"})


def parse_fields(lines: list[bytes]) -> dict[bytes, bytes]:
    """A request's header lines (CRLF removed) as ``{Title-Case-Name: value}``, strictly.

    The one parser of header fields here: the gate reads a head with it (to know how much body
    to wait for) and cheroot's request reads the same head with it (through
    :class:`StrictHeaderReader`), so the two never disagree on framing. Refused with
    ``ValueError`` (a 400, and the connection closed), as RFC 9112 asks: whitespace between a
    field's name and its colon (section 5.1), a line folded onto the one before (obs-fold), a
    name that is not a token, a line without a colon, and a second Content-Length,
    Transfer-Encoding or Host. Other repeated fields are joined with ``", "``.
    """
    fields: dict[bytes, bytes] = {}
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise ValueError("a header line folded onto the one before (obs-fold)")
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError(f"a header line without a colon: {line[:80]!r}")
        if not _TOKEN.fullmatch(name):
            if name.rstrip(b" \t") != name and _TOKEN.fullmatch(name.rstrip(b" \t")):
                raise ValueError(f"whitespace between the header name {name.strip()!r} and its colon")
            raise ValueError(f"a header name that is not a token: {name[:80]!r}")
        key = name.title()
        value = value.strip(b" \t")
        if key in fields:
            if key in _SINGLE:
                raise ValueError(f"more than one {key.decode('latin-1')} header")
            value = fields[key] + b", " + value
        fields[key] = value
    return fields


class StrictHeaderReader(HeaderReader):
    """cheroot's header reading, done by :func:`parse_fields`, and a length left unambiguous.

    A ``ValueError`` here makes cheroot answer ``400`` with its message and close.
    """

    def __init__(self, drop_expect: bool = False) -> None:
        self.drop_expect = drop_expect

    def __call__(self, rfile: Any, hdict: Any = None) -> Any:
        lines = []
        while True:
            line = rfile.readline()
            if not line:
                raise ValueError("the request's head ends before its empty line")
            if line == b"\r\n":
                break
            if not line.endswith(b"\r\n") or b"\n" in line[:-2]:
                raise ValueError("header lines must end with CRLF")
            lines.append(line[:-2])
        headers = parse_fields(lines)
        length = headers.get(b"Content-Length")
        if length is not None and b"Transfer-Encoding" in headers:
            raise ValueError("Content-Length and Transfer-Encoding together")
        if length is not None and not length.isdigit():
            raise ValueError(f"Content-Length {length.decode('latin-1')!r} is not a number of bytes")
        if self.drop_expect:
            headers.pop(b"Expect", None)  # the gate has said 100 Continue already
        if hdict is None:
            return dict(headers)
        hdict.update(headers)
        return hdict


class _Inbox(socket.SocketIO):
    """The read side of a connection: the bytes the gate took first, then the socket.

    While a request is read, every receive keeps to its ``deadline``; cheroot answers the
    ``TimeoutError("timed out")`` this raises with 408.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, "rb")
        self.sock = sock
        self.pending = bytearray()
        self.waiting = False  # pending holds the start of a request, not a whole one
        self.deadline: float | None = None

    def readinto(self, buffer: WriteableBuffer) -> int | None:
        if self.pending:
            view = memoryview(buffer).cast("B")
            size = min(len(view), len(self.pending))
            view[:size] = self.pending[:size]
            del self.pending[:size]
            return size
        if self.deadline is None:
            return super().readinto(buffer)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        idle = self.sock.gettimeout()
        self.sock.settimeout(remaining if idle is None else min(idle, remaining))
        try:
            return super().readinto(buffer)
        finally:
            self.sock.settimeout(idle)

    def pull(self) -> bool:
        """Take what the socket holds now, without waiting; False once the client has gone."""
        idle = self.sock.gettimeout()
        if idle is not None:
            # A socket with a timeout is non-blocking underneath: one read, no switching of
            # modes around it (two system calls fewer per request).
            try:
                data = os.read(self.sock.fileno(), _RECV_SIZE)
            except BlockingIOError:
                return True
            except OSError:
                return False
            self.pending += data
            return bool(data)
        self.sock.settimeout(0.0)
        try:
            data = self.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(idle)
        self.pending += data
        return bool(data)

    def send_now(self, data: bytes) -> None:
        """Send a short answer from the selector thread: without waiting, or not at all."""
        idle = self.sock.gettimeout()
        self.sock.settimeout(0.0)
        try:
            self.sock.send(data)
        except OSError:
            pass  # a client that reads nothing gets nothing
        finally:
            self.sock.settimeout(idle)


class _Reader(StreamReader):
    """cheroot's socket reader over an :class:`_Inbox`."""

    def __init__(self, inbox: _Inbox, bufsize: int) -> None:
        # StreamReader.__init__ would wrap a socket.SocketIO of its own: skip to BufferedReader's.
        super(StreamReader, self).__init__(inbox, bufsize)
        self.bytes_read = 0
        self.inbox = inbox

    def buffered(self) -> bool:
        return bool(super().has_data())  # type: ignore[no-untyped-call]

    def has_data(self) -> bool:
        """Whether a request may be here already (cheroot then serves it without waiting)."""
        return self.buffered() or (bool(self.inbox.pending) and not self.inbox.waiting)


class _Outbox(StreamWriter):
    """cheroot's socket writer, holding what an answer writes until it ends (:data:`HOLD_LIMIT`).

    cheroot writes an answer's head and its body apart, each a send (and a poll) of its own.
    """

    def __init__(self, sock: socket.socket, mode: str, bufsize: int) -> None:
        super().__init__(sock, mode, bufsize)
        self.holding = False
        self.held = bytearray()

    def write(self, b: Any, /) -> int:
        if not self.holding:
            return int(super().write(b))  # type: ignore[no-untyped-call]
        self.held += b
        if len(self.held) >= HOLD_LIMIT:
            self.release()
            self.holding = True
        return len(b)

    def release(self) -> None:
        """Send what is held, and hold nothing more."""
        self.holding = False
        if self.held:
            data = bytes(self.held)
            self.held.clear()
            super().write(data)  # type: ignore[no-untyped-call]


class _Request(HTTPRequest):
    """One request: strict headers, a deadline for reading it, and JSON for cheroot's answers."""

    header_reader = StrictHeaderReader()
    conn: _Connection

    def __init__(self, server: Any, conn: _Connection) -> None:
        super().__init__(server, conn, proxy_mode=True)  # as CherryPy's own request class
        if conn.continued:
            self.header_reader = StrictHeaderReader(drop_expect=True)

    def parse_request(self) -> None:
        self.conn.start_request(self.server.request_timeout)
        super().parse_request()

    def respond(self) -> None:
        outbox = self.conn.wfile if isinstance(self.conn.wfile, _Outbox) else None
        if outbox is not None:
            outbox.holding = True
        try:
            super().respond()
        except BaseException:
            if outbox is not None:
                with contextlib.suppress(OSError):
                    outbox.release()
            raise
        else:
            if outbox is not None:
                outbox.release()
        finally:
            self.conn.end_request()

    def send_headers(self) -> None:
        # cheroot keeps a connection the application answered "Connection: close" on (a body
        # left unread, a broken chunked stream): the next "request" would be the rest of it.
        if any(key.lower() == b"connection" and value.lower() == b"close" for key, value in self.outheaders):
            self.close_connection = True
        # A body the application did not read (a 401, 404 or 415 decided from the head alone):
        # cheroot would read all of it into memory to keep the connection (128 MiB: +250 MB
        # RSS), and a chunked one it leaves on the wire, to be parsed as the next request.
        # Close instead; a small rest that is here already is cheaper to drop.
        if self.chunked_read:
            unread = not getattr(self.rfile, "closed", True)
        else:
            unread = getattr(self.rfile, "remaining", 0) > DRAIN_LIMIT
        if unread:
            self.close_connection = True
            self.conn.lingering = True
            self.outheaders = [(k, v) for k, v in self.outheaders if k.lower() != b"connection"]
            self.outheaders.append((b"Connection", b"close"))
        super().send_headers()

    def simple_response(self, status: Any, msg: Any = "") -> None:
        status = str(status)
        detail = msg.decode("latin-1") if isinstance(msg, bytes) else str(msg or status[4:])
        body = json.dumps({"error": _KINDS.get(int(status[:3]), "http_error"), "detail": detail}).encode()
        head = (
            f"{self.server.protocol} {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        self.close_connection = True
        try:
            self.conn.wfile.write(head.encode("latin-1") + body)
        except OSError as exc:
            if exc.args[0] not in errors.socket_errors_to_ignore:
                raise


class _Connection(HTTPConnection):
    """A connection that waits at the gate until its request is here."""

    RequestHandlerClass = _Request

    def __init__(self, server: Any, sock: Any, makefile: Any = MakeFile) -> None:
        self.inbox: _Inbox | None = None
        self.started: float | None = None  # when the current request's first byte came
        self.continued = False  # the gate answered "Expect: 100-continue"
        self.lingering = False  # an answer went out before the body was read: close gently
        self.refusal = ""  # why the gate refused the head
        # Only a plain socket gets an inbox: a TLS connection keeps cheroot's files (and no gate).
        super().__init__(server, sock, self._files if makefile is MakeFile else makefile)

    def close(self) -> None:
        if self.lingering:
            self._lingering_close()
        super().close()

    def _lingering_close(self) -> None:
        """Close after a body left unread so that the client still reads our answer.

        Closing with unread bytes in the socket makes the kernel send a reset, which can reach
        the client before our answer does. So: end our side (FIN after the answer), then read
        and drop what still comes, into one small buffer, for at most
        :data:`LINGER_SECONDS` and :data:`LINGER_BYTES` (Apache's lingering close).
        """
        self.lingering = False
        sock = self.socket
        buffer = bytearray(_RECV_SIZE)
        deadline = time.monotonic() + LINGER_SECONDS
        dropped = 0
        try:
            sock.shutdown(socket.SHUT_WR)
            while dropped < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                received = sock.recv_into(buffer)
                if not received:
                    break
                dropped += received
        except OSError:
            pass  # the client went (or the socket never was a plain one): nothing to wait for

    def _files(self, sock: socket.socket, mode: str, bufsize: int) -> Any:
        if "r" not in mode:
            return _Outbox(sock, mode, bufsize)
        self.inbox = _Inbox(sock)
        return _Reader(self.inbox, bufsize)

    def gate(self, timeout: float) -> Verdict:
        """Whether a thread can serve the next request without waiting on the client."""
        inbox = self.inbox
        if inbox is None or self.rfile.buffered():
            return "ready"  # TLS, or pipelined bytes already read: the thread's deadline holds
        here = inbox.pull()
        if inbox.pending and self.started is None:
            self.started = time.monotonic()
        try:
            arrived = self._arrived(inbox)
        except ValueError as exc:
            self.refusal = str(exc)
            return "bad"
        if arrived:
            inbox.waiting = False
            return "ready"
        if not here:
            return "gone"
        inbox.waiting = True
        if self.started is not None and time.monotonic() - self.started >= timeout:
            return "late"
        return "wait"

    def _arrived(self, inbox: _Inbox) -> bool:
        pending = inbox.pending
        end = pending.find(_END_OF_HEAD)
        if _BARE_LF.search(pending, 0, len(pending) if end < 0 else end + len(_END_OF_HEAD)):
            raise ValueError("the request's lines must end with CRLF, not a bare LF")
        if end < 0:
            return len(pending) >= HEAD_LIMIT  # the thread answers 413 from what is here
        received = len(pending) - end - len(_END_OF_HEAD)
        wanted, expects_continue = _body_wanted(bytes(pending[:end]))
        if wanted is None:  # chunked: the end of the last chunk, or enough
            return received >= BODY_PREBUFFER or (received > 0 and pending.endswith(_END_OF_HEAD))
        if wanted and not received and expects_continue and not self.continued:
            inbox.send_now(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.continued = True
        return received >= wanted

    def start_request(self, timeout: float) -> None:
        if self.inbox is not None:
            started = self.started if self.started is not None else time.monotonic()
            self.inbox.deadline = started + timeout

    def end_request(self) -> None:
        self.started = None
        self.continued = False
        if self.inbox is not None:
            self.inbox.deadline = None

    def refuse_bad(self) -> None:
        """Answer a head the gate could not accept 400, from the selector thread."""
        detail = json.dumps({"error": "bad_request", "detail": self.refusal}).encode()
        head = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
        if self.inbox is not None:
            self.inbox.send_now(head + b"Content-Length: %d\r\n\r\n" % len(detail) + detail)

    def refuse_late(self) -> None:
        """Answer a request that did not arrive in time 408, from the selector thread."""
        body = b'{"error": "request_timeout", "detail": "the request did not arrive in time"}'
        head = b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
        if self.inbox is not None:
            self.inbox.send_now(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def _body_wanted(head: bytes) -> tuple[int | None, bool]:
    """How many body bytes the gate waits for (None: chunked), and whether 100 Continue is due.

    Read with :func:`parse_fields`, the parser the request itself uses; a head it refuses
    raises ``ValueError`` (the gate answers 400). A head with ambiguous framing wants nothing:
    a thread refuses it at once.
    """
    fields = parse_fields(head.split(b"\r\n")[1:])
    length = fields.get(b"Content-Length")
    expects_continue = fields.get(b"Expect", b"").lower() == b"100-continue"
    if b"Transfer-Encoding" in fields:
        return (None, expects_continue) if length is None else (0, False)
    if length is not None and length.isdigit():
        return min(int(length), BODY_PREBUFFER), expects_continue
    return 0, False


class HardenedServer(CPWSGIServer):  # type: ignore[misc]
    """CherryPy's WSGI server with the gate, the deadlines and the strict framing above."""

    def __init__(self, adapter: Any, request_timeout: float) -> None:
        """Serve as CherryPy's ``adapter`` (``cherrypy.server``) says, with ``request_timeout``."""
        if request_timeout <= 0 or not adapter.socket_timeout or adapter.socket_timeout <= 0:
            raise ValueError("the request and idle timeouts must be above 0 seconds")
        super().__init__(adapter)
        # After CherryPy's __init__, which points the connection class it finds at its own requests.
        self.ConnectionClass = _Connection
        self.request_timeout = request_timeout

    def process_conn(self, conn: Any) -> None:
        """Hand ``conn`` to a thread once its request is here; until then, park it."""
        verdict = conn.gate(self.request_timeout) if isinstance(conn, _Connection) else "ready"
        if verdict == "ready":
            super().process_conn(conn)
        elif verdict == "wait":
            self.put_conn(conn)  # back into the selector, no thread
            # The selector closes connections idle for `timeout` since last_used: date it so
            # that this one goes at its request's deadline or after `timeout` of silence.
            now = time.monotonic()
            expires = now + self.timeout
            if conn.started is not None:
                expires = min(expires, conn.started + self.request_timeout)
            conn.last_used = time.time() + (expires - now) - self.timeout
        else:
            if verdict == "late":
                conn.refuse_late()
            elif verdict == "bad":
                conn.refuse_bad()
            conn.close()
