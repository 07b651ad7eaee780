"""One download in a fresh process, for ``benchmarks/run.py`` (which reads this process's peak RSS).

Usage: ``PYTHON download_child.py TOOL CART_API_URL CART_UID EVENT_JSON LOCATION``

``TOOL`` is ``ours`` (our ``Downloader`` with ``bundle=False``: a plain cart, as ``curl | tar``
gets), ``bundle`` (ours with ``bundle=True``) or ``upstream`` (pacifica-downloader 0.4.1). It
runs under ``.venv`` (ours) or ``.venv-upstream`` (upstream), so only the standard library is
imported here before the tool itself. The cart's uid is fixed by the harness (both libraries
pick a uuid4 themselves; only that choice is replaced), so the harness can watch the cart's
status while this process downloads it. Ours reads the event file with
``CloudEvent.read_files``, as our command line does (the text is read a window at a time and
only the files are kept), upstream with ``json.loads``.

Prints one JSON line: ``{"start", "ready_seen", "done", "vmhwm_kb"}``, plus for ours
``"deleted"`` and ``"deletes_done"``. Times are on ``time.monotonic()`` (one clock for every
process on Linux): ``ready_seen`` is when the tool itself saw the cart ready, ``done`` when its
download call returned. Ours deletes the cart in a background thread after returning;
``deleted`` is when ``Downloader.wait_for_deletes()`` returned after that (``deletes_done``:
whether the delete finished within ``DELETE_TIMEOUT``). Upstream 0.4.1 never deletes its carts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

DELETE_TIMEOUT = 300.0  # seconds ours may take to delete its cart after returning
# Upstream's cloudevent() waits `timeout` polls of 1 s (120 by default) for the cart; Cartd here
# takes up to ~2.5 min to stage 2000 small files, so it gets as long as the harness allows.
UPSTREAM_CART_TIMEOUT = 900


def run_ours(cart_api_url: str, uid: str, event_path: str, location: str, bundle: bool) -> dict[str, Any]:
    from downloader_service import CloudEvent, Downloader, DownloadProgress

    # As our command line reads an event file: a window at a time, keeping only the files.
    with open(event_path, "rb") as source:
        files = CloudEvent.read_files(source)
    marks: dict[str, Any] = {}

    class ReadyMark(DownloadProgress):
        def cart_status(self, status: str, message: str) -> None:
            if status == "ready":
                marks.setdefault("ready_seen", time.monotonic())

    downloader = Downloader(location, cart_api_url, progress=ReadyMark(), bundle=bundle)
    cart_url = f"{cart_api_url.rstrip('/')}/{uid}"
    downloader.cart_api.new_cart_url = lambda: cart_url  # type: ignore[method-assign]
    marks["start"] = time.monotonic()
    downloader.download(files)
    marks["done"] = time.monotonic()
    marks["deletes_done"] = downloader.wait_for_deletes(DELETE_TIMEOUT)
    marks["deleted"] = time.monotonic()
    return marks


def run_upstream(cart_api_url: str, uid: str, event_path: str, location: str) -> dict[str, Any]:
    import pacifica.downloader.cartapi  # type: ignore[import-not-found]
    from pacifica.downloader import Downloader

    pacifica.downloader.cartapi.uuid = lambda: uid
    marks: dict[str, Any] = {}
    downloader = Downloader(cart_api_url=cart_api_url)
    wait_for_cart = downloader.cart_api.wait_for_cart

    def timed_wait(cart_url: str, timeout: int = 120) -> str:
        url: str = wait_for_cart(cart_url, timeout)
        marks["ready_seen"] = time.monotonic()
        return url

    downloader.cart_api.wait_for_cart = timed_wait
    event = json.loads(Path(event_path).read_bytes())
    marks["start"] = time.monotonic()
    downloader.cloudevent(location, event, timeout=UPSTREAM_CART_TIMEOUT)
    marks["done"] = time.monotonic()
    return marks


def peak_rss_kb() -> int:
    """This process's own high-water RSS (``VmHWM``), a cross-check of the launcher's figure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main(argv: list[str]) -> int:
    tool, cart_api_url, uid, event_path, location = argv
    if tool == "upstream":
        marks = run_upstream(cart_api_url, uid, event_path, location)
    elif tool in ("ours", "bundle"):
        marks = run_ours(cart_api_url, uid, event_path, location, bundle=tool == "bundle")
    else:
        raise SystemExit(f"unknown tool {tool!r}: ours, bundle or upstream")
    marks["vmhwm_kb"] = peak_rss_kb()
    print(json.dumps(marks), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
