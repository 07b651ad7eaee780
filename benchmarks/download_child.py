"""One download in a fresh process, for ``benchmarks/run.py`` (which reads this process's peak RSS).

Usage: ``PYTHON download_child.py {ours,upstream} CART_API_URL CART_UID EVENT_JSON LOCATION``

Runs under ``.venv`` (ours) or ``.venv-upstream`` (pacifica-downloader 0.4.1), so only the
standard library is imported here before the tool itself. The cart's uid is fixed by the
harness (both libraries pick a uuid4 themselves; only that choice is replaced), so the harness
can watch the cart's status while this process downloads it. Prints one JSON line:
``{"start", "ready_seen", "done", "vmhwm_kb"}``: times on ``time.monotonic()`` (one clock for
every process on Linux), ``ready_seen`` being when the tool itself saw the cart ready.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def run_ours(cart_api_url: str, uid: str, event: dict[str, Any], location: str) -> dict[str, float]:
    import types

    import downloader_service.cartapi
    from downloader_service import Downloader, DownloadProgress

    downloader_service.cartapi.uuid = types.SimpleNamespace(uuid4=lambda: uid)  # type: ignore[assignment]
    marks: dict[str, float] = {}

    class ReadyMark(DownloadProgress):
        def cart_status(self, status: str, message: str) -> None:
            if status == "ready":
                marks.setdefault("ready_seen", time.monotonic())

    downloader = Downloader(location, cart_api_url, progress=ReadyMark())
    marks["start"] = time.monotonic()
    downloader.cloudevent(event)
    marks["done"] = time.monotonic()
    return marks


def run_upstream(cart_api_url: str, uid: str, event: dict[str, Any], location: str) -> dict[str, float]:
    import pacifica.downloader.cartapi
    from pacifica.downloader import Downloader

    pacifica.downloader.cartapi.uuid = lambda: uid
    marks: dict[str, float] = {}
    downloader = Downloader(cart_api_url=cart_api_url)
    wait_for_cart = downloader.cart_api.wait_for_cart

    def timed_wait(cart_url: str, timeout: int = 120) -> str:
        url: str = wait_for_cart(cart_url, timeout)
        marks["ready_seen"] = time.monotonic()
        return url

    downloader.cart_api.wait_for_cart = timed_wait
    marks["start"] = time.monotonic()
    downloader.cloudevent(location, event)
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
    event = json.loads(Path(event_path).read_text(encoding="utf-8"))
    run = run_ours if tool == "ours" else run_upstream
    marks: dict[str, float] = dict(run(cart_api_url, uid, event, location))
    marks["vmhwm_kb"] = peak_rss_kb()
    print(json.dumps(marks), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
