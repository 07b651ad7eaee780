"""A small Cartd look-alike on 127.0.0.1 for fault injection the real Cartd cannot produce.

It speaks the same wire protocol (POST/HEAD/GET/DELETE on ``/<uid>``, ``X-Pacifica-*``
headers, a chunked tar body) and lets a test replace any answer: a status sequence, a
hostile tar, a stream that stalls or breaks off.
"""

from __future__ import annotations

import hashlib
import json
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@dataclass
class Member:
    """One tar member to build: a file by default, or any tarfile type."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None  # override the declared size


def build_tar(members: Iterable[Member], end: bool = True) -> bytes:
    """Build an uncompressed tar by hand, so a test can make headers lie about sizes."""
    out = bytearray()
    for member in members:
        info = tarfile.TarInfo(member.name)
        info.type = member.type
        info.linkname = member.linkname
        info.mtime = 1_500_000_000
        info.mode = 0o755 if member.type == tarfile.DIRTYPE else 0o644
        info.size = len(member.data) if member.size is None else member.size
        if member.type != tarfile.REGTYPE:
            info.size = 0
        out += info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if member.type == tarfile.REGTYPE:
            out += member.data + b"\0" * (-len(member.data) % tarfile.BLOCKSIZE)
    if end:
        out += b"\0" * (2 * tarfile.BLOCKSIZE)
    return bytes(out)


def cart_tar(fileids: list[dict[str, str]], contents: dict[str, bytes], filename: str) -> bytes:
    """The tar Cartd would send for ``fileids``: parent directories, then each file."""
    members: list[Member] = [Member(filename, type=tarfile.DIRTYPE)]
    seen = {filename}
    for obj in fileids:
        parts = obj["path"].split("/")
        for i in range(1, len(parts)):
            directory = "/".join([filename, *parts[:i]])
            if directory not in seen:
                seen.add(directory)
                members.append(Member(directory, type=tarfile.DIRTYPE))
        members.append(Member(f"{filename}/{obj['path']}", contents[obj["id"]]))
    return build_tar(members)


@dataclass
class Cart:
    """What the fake knows of one cart."""

    uid: str
    fileids: list[dict[str, str]]
    heads: int = 0
    bundle: bool = False  # POSTed with "bundle": true


@dataclass
class FakeCartd:
    """The server and its knobs; every knob may be replaced by a test."""

    contents: dict[str, bytes] = field(default_factory=dict)
    carts: dict[str, Cart] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    # The Authorization header of each request, in order ("" when none was sent).
    authorizations: list[str] = field(default_factory=list)
    post_status: int = 201
    # head(cart) -> (status code, X-Pacifica-Status, X-Pacifica-Message)
    head: Callable[[Cart], tuple[int, str, str]] = lambda cart: (204, "ready", "")
    # body(cart, filename) -> the GET body; chunks let a test stall or stop mid-way
    body: Callable[[Cart, str], Iterable[bytes]] | None = None
    get_status: int = 200
    chunk: int = 64 * 1024
    deleted: list[str] = field(default_factory=list)
    # Bundled carts are served as Cartd serves them: a static tar whose top directory is the
    # uid, with Content-Length and Accept-Ranges, a single ``Range: bytes=N-`` honoured (206)
    # unless ``honour_range`` is False (then the whole tar, 200).
    honour_range: bool = True
    # Tar offsets at which to drop bundle GETs: each GET that would pass the first one left
    # sends up to it, then the connection is closed (the offset is used up).
    bundle_cuts: list[int] = field(default_factory=list)
    # Body bytes sent for GETs in all, and the Range header of each GET ("" for none).
    bytes_sent: int = 0
    ranges: list[str] = field(default_factory=list)
    # Runs before a DELETE is answered: a test can make Cartd slow to delete.
    before_delete: Callable[[], object] = field(default=lambda: None)
    # Runs before a POST makes its cart: a test can hold Cartd mid-POST.
    before_post: Callable[[], object] = field(default=lambda: None)
    server: ThreadingHTTPServer | None = None
    thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, file_id: str | int, data: bytes) -> dict[str, str]:
        """Store a file and return its Cartd ``fileids`` object (path still to be set)."""
        self.contents[str(file_id)] = data
        return {"id": str(file_id), "hashtype": "sha1", "hashsum": sha1(data)}

    def start(self) -> FakeCartd:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _uid(self) -> str:
                return self.path.split("?")[0].strip("/")

            def do_POST(self) -> None:
                fake.requests.append(("POST", self.path))
                fake.authorizations.append(self.headers.get("Authorization", ""))
                fake.before_post()
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                bundle = body.get("bundle") is True
                fake.carts[self._uid()] = Cart(self._uid(), body["fileids"], bundle=bundle)
                self._reply(fake.post_status, b'{"message": "Cart Processing has begun"}')

            def do_HEAD(self) -> None:
                fake.requests.append(("HEAD", self.path))
                fake.authorizations.append(self.headers.get("Authorization", ""))
                cart = fake.carts.get(self._uid())
                if cart is None:
                    self._reply(404, b"", {"X-Pacifica-Status": "error", "X-Pacifica-Message": "no cart"})
                    return
                cart.heads += 1
                code, status, message = fake.head(cart)
                self._reply(code, b"", {"X-Pacifica-Status": status, "X-Pacifica-Message": message})

            def do_DELETE(self) -> None:
                fake.requests.append(("DELETE", self.path))
                fake.authorizations.append(self.headers.get("Authorization", ""))
                fake.before_delete()
                fake.deleted.append(self._uid())
                self._reply(200, b'{"message": "Cart Deleted Successfully"}')

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path))
                fake.authorizations.append(self.headers.get("Authorization", ""))
                cart = fake.carts.get(self._uid())
                if cart is None or fake.get_status != 200:
                    self._reply(404 if cart is None else fake.get_status, b'{"message": "no such cart"}')
                    return
                filename = self.path.partition("filename=")[2] or "data"
                fake.ranges.append(self.headers.get("Range", ""))
                if cart.bundle and fake.body is None:
                    self._static(cart_tar(cart.fileids, fake.contents, cart.uid))
                    return
                if fake.body is not None:
                    chunks = fake.body(cart, filename)
                else:
                    data = cart_tar(cart.fileids, fake.contents, filename)
                    chunks = (data[i : i + fake.chunk] for i in range(0, len(data), fake.chunk))
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for chunk in chunks:
                        if chunk:
                            fake.bytes_sent += len(chunk)
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
                except CloseConnection:
                    # Drop the connection mid-body, as a crashed server or proxy would.
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _static(self, data: bytes) -> None:
                start = 0
                wanted = self.headers.get("Range", "")
                if fake.honour_range and wanted.startswith("bytes=") and wanted.endswith("-"):
                    start = int(wanted[len("bytes=") : -1])
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                end = len(data)
                cuts = [cut for cut in fake.bundle_cuts if cut > start]
                if cuts:
                    end = cuts[0]
                    fake.bundle_cuts.remove(end)
                for offset in range(start, end, fake.chunk):
                    piece = data[offset : min(offset + fake.chunk, end)]
                    fake.bytes_sent += len(piece)
                    try:
                        self.wfile.write(piece)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                if end < len(data):
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _reply(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class CloseConnection(Exception):
    """Raised from a body generator to make the fake drop the connection."""


def cut_after(data: bytes, nbytes: int) -> Iterable[bytes]:
    """A body that sends ``nbytes`` of ``data`` then drops the connection."""
    yield data[:nbytes]
    raise CloseConnection


def stall_after(data: bytes, nbytes: int, seconds: float) -> Iterable[bytes]:
    """A body that sends ``nbytes`` of ``data`` then goes silent for ``seconds``."""
    yield data[:nbytes]
    time.sleep(seconds)
    yield data[nbytes:]


def closed_port() -> int:
    """A local port with nothing listening (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
