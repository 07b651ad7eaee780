"""Bundled carts vs plain carts, and resuming a broken bundle, on the real Cartd.

Run from the repository root::

    .venv/bin/python benchmarks/bundle.py [--mb 500] [--runs 3] [--sweep 4,16,64,256] [--out FILE]

Everything runs on 127.0.0.1: the real Archive Interface + Cartd + Celery worker
(``devstack/pacifica.py``, from ``.venv-pacifica``) in a temporary directory that is removed
at the end, with the downloads. Three measurements:

``sweep``
    one file of each size (MiB), downloaded with ``bundle=True`` and ``bundle=False``
    alternately: where bundling starts to pay (``DEFAULT_BUNDLE_THRESHOLD``);
``large``
    one ``--mb`` file, bundled vs plain: wall time (cart, wait, stream, verify, commit);
``resume``
    the same file bundled, through a small proxy that cuts the first GET at 90 % of its
    ``Content-Length``; it counts the bytes it forwarded to the downloader in all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devstack.pacifica import PacificaStack  # noqa: E402
from downloader_service import Downloader  # noqa: E402
from downloader_service.cartfile import CartFile  # noqa: E402

MiB = 1 << 20
_HOP_HEADERS = ("connection", "transfer-encoding", "keep-alive", "server", "date")
PACIFICA_VENV = Path(os.environ.get("PACIFICA_VENV", REPO / ".venv-pacifica"))


def make_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their sha1."""
    digest = hashlib.sha1()
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(MiB, left))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


class Stack:
    """The real stack and the files stored in it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.pacifica = PacificaStack(work / "stack", PACIFICA_VENV)
        self.next_id = 1

    def store(self, size: int) -> CartFile:
        """A fresh random file of ``size`` bytes in the archive, as a cart file."""
        source = self.work / "source.bin"
        sha1 = make_file(source, size)
        file_id = self.next_id
        self.next_id += 1
        self.pacifica.put_file_from_path(file_id, source)
        source.unlink()
        return CartFile(str(file_id), f"f{file_id}.bin", "sha1", sha1, size)


def download(url: str, dest: Path, files: list[CartFile], bundle: bool) -> dict[str, Any]:
    """One download with our library; the files are removed after, the cart deleted."""
    downloader = Downloader(dest, url, bundle=bundle, cart_timeout=300)
    try:
        result = downloader.download(files)
    finally:
        downloader.wait_for_deletes(120)  # outside the timing, as the library does it
        shutil.rmtree(dest, ignore_errors=True)
    return {"seconds": result.seconds, "staging": result.staging_seconds, "bytes": result.bytes}


def compare(stack: Stack, url: str, files: list[CartFile], runs: int) -> dict[str, Any]:
    """Bundled and plain downloads of ``files``, alternating; medians of ``runs`` each."""
    seen: dict[str, list[dict[str, Any]]] = {"bundle": [], "plain": []}
    for _ in range(runs):
        for kind in ("bundle", "plain"):
            seen[kind].append(download(url, stack.work / "dl", files, kind == "bundle"))
    summary: dict[str, Any] = {}
    for kind, rows in seen.items():
        summary[kind] = {
            "wall_s": round(statistics.median(r["seconds"] for r in rows), 3),
            "staging_s": round(statistics.median(r["staging"] for r in rows), 3),
            "walls": [round(r["seconds"], 3) for r in rows],
        }
    summary["ratio"] = round(summary["bundle"]["wall_s"] / summary["plain"]["wall_s"], 3)
    return summary


class CuttingProxy:
    """Forward to Cartd; cut the first cart GET at ``fraction`` of its length; count bytes."""

    def __init__(self, upstream: str, fraction: float) -> None:
        self.upstream = upstream
        self.fraction = fraction
        self.body_bytes = 0  # bytes of GET bodies sent to the downloader, all requests
        self.gets: list[tuple[str, int]] = []  # (Range header, status)
        self.cut = False
        self.tar_bytes = 0  # Content-Length of the first, whole, GET
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> CuttingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "range")}
                target = proxy.upstream + self.path
                with requests.request(
                    self.command, target, data=body, headers=headers, stream=True, timeout=300
                ) as resp:
                    self.send_response(resp.status_code)
                    for key, value in resp.headers.items():
                        if key.lower() not in _HOP_HEADERS:
                            self.send_header(key, value)
                    total = resp.headers.get("Content-Length")
                    if total is None and self.command != "HEAD":
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    cut_at = None
                    if self.command == "GET":
                        proxy.gets.append((self.headers.get("Range", ""), resp.status_code))
                        if not proxy.cut and total is not None and resp.status_code == 200:
                            proxy.cut = True
                            proxy.tar_bytes = int(total)
                            cut_at = int(int(total) * proxy.fraction)
                    sent = 0
                    for chunk in resp.raw.stream(1 << 20, decode_content=False):
                        if cut_at is not None and sent + len(chunk) >= cut_at:
                            self.wfile.write(chunk[: cut_at - sent])
                            proxy.body_bytes += cut_at - sent
                            self.wfile.flush()
                            self.close_connection = True
                            return
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        if self.command == "GET":
                            proxy.body_bytes += len(chunk)

            do_GET = do_HEAD = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def resume_run(stack: Stack, url: str, files: list[CartFile]) -> dict[str, Any]:
    """A bundled download cut at 90 % by the proxy: it must resume and fetch little more."""
    proxy = CuttingProxy(url, 0.9).start()
    try:
        row = download(proxy.url, stack.work / "dl", files, True)
    finally:
        proxy.stop()
    return {
        **row,
        "tar_bytes": proxy.tar_bytes,
        "bytes_fetched": proxy.body_bytes,
        "fetched_per_tar_byte": round(proxy.body_bytes / proxy.tar_bytes, 4) if proxy.tar_bytes else None,
        "gets": proxy.gets,
    }


@contextmanager
def running_stack(work: Path) -> Iterator[Stack]:
    stack = Stack(work)
    stack.pacifica.start(timeout=90)
    try:
        yield stack
    finally:
        stack.pacifica.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500, help="size of the large file, MB (10^6 bytes)")
    parser.add_argument("--files", type=int, default=10, help="the large set is this many files")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sweep", default="4,16,64,256", help="MiB sizes to compare ('' to skip)")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bundle-bench-") as tmp, running_stack(Path(tmp)) as stack:
        url = stack.pacifica.cartd_url
        download(url, stack.work / "dl", [stack.store(MiB)], True)  # warm up both paths
        download(url, stack.work / "dl", [stack.store(MiB)], False)
        for mib in [int(x) for x in args.sweep.split(",") if x]:
            report[f"sweep_{mib}MiB"] = row = compare(stack, url, [stack.store(mib * MiB)], args.runs)
            print(f"{mib} MiB: {json.dumps(row)}", flush=True)
        if not args.skip_large:
            one = [stack.store(args.mb * 10**6)]
            report["large_1_file"] = row = compare(stack, url, one, args.runs)
            print(f"{args.mb} MB in 1 file: {json.dumps(row)}", flush=True)
            stack.pacifica.archive_path(one[0].id).unlink()  # disk: the 1-file set is done
            many = [stack.store(args.mb * 10**6 // args.files) for _ in range(args.files)]
            report[f"large_{args.files}_files"] = row = compare(stack, url, many, args.runs)
            print(f"{args.mb} MB in {args.files} files: {json.dumps(row)}", flush=True)
            # A file cut midway is fetched again from its header: with one file the waste is
            # up to the whole cart, with N files up to 1/N of it.
            report["resume"] = row = resume_run(stack, url, many)
            print(f"resume at 90 %: {json.dumps(row)}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
