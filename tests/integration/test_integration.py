"""End to end against the real Pacifica Cartd 0.7.0 and Archive Interface 0.4.2."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3.exceptions
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent as SDKCloudEvent
from werkzeug.test import Client

from devstack.pacifica import PacificaStack
from downloader_service import CartAPI, CartFailedError, Downloader, InvalidEventError
from downloader_service.service.app import create_app
from downloader_service.service.settings import settings_from_env
from tests.conftest import LocalClient
from tests.events import file_obj, make_event

pytestmark = pytest.mark.integration

UNICODE_NAME = "パソコン資産管理台帳（S&T HK）_現地調達PC.xls"


def stored(
    stack: PacificaStack, ids: Iterator[int], data: bytes, name: str, subdir: str = ""
) -> dict[str, Any]:
    """Put ``data`` in the archive under a fresh id; return its ``Files`` metadata object."""
    file_id = next(ids)
    stack.put_file(file_id, data)
    return file_obj(file_id, name, subdir, data)


def cart_gone(cart_url: str) -> bool:
    return requests.head(cart_url, timeout=5).status_code == 404


def test_transactioninfo_downloads_verified_files(
    pacifica_stack: PacificaStack, file_ids: Iterator[int], tmp_path: Path
) -> None:
    foo, bar = os.urandom(300_000), b"bar\n"
    files = [
        stored(pacifica_stack, file_ids, foo, "foo.txt", "a/b/"),
        stored(pacifica_stack, file_ids, bar, "bar.txt"),
    ]
    transinfo = {
        "files": {str(f["_id"]): {k: f[k] for k in ("name", "subdir", "hashtype", "hashsum")} for f in files}
    }
    downloader = Downloader(tmp_path, pacifica_stack.cartd_url)
    result = downloader.transactioninfo(transinfo)
    assert downloader.wait_for_deletes(30)  # the result came first; the DELETE follows
    assert (tmp_path / "data/a/b/foo.txt").read_bytes() == foo
    assert (tmp_path / "data/bar.txt").read_bytes() == bar
    assert result.bytes == len(foo) + len(bar)
    assert cart_gone(result.cart_url)


def test_upstream_fixture_event_downloads_once_its_file_has_an_id(
    pacifica_stack: PacificaStack,
    file_ids: Iterator[int],
    notifications_event: dict[str, Any],
    tmp_path: Path,
) -> None:
    # Every file in the fixture carries sha1("foo\n"); store that content under its ids.
    files = [obj for obj in notifications_event["data"] if obj["destinationTable"] == "Files"]
    assert {f["hashsum"] for f in files} == {hashlib.sha1(b"foo\n").hexdigest()}
    with pytest.raises(InvalidEventError, match="_id is missing"):
        Downloader(tmp_path / "refused", pacifica_stack.cartd_url).cloudevent(notifications_event)
    assert not (tmp_path / "refused").exists()

    for obj in files:
        obj["_id"] = next(file_ids)
        pacifica_stack.put_file(obj["_id"], b"foo\n")
    result = Downloader(tmp_path, pacifica_stack.cartd_url).cloudevent(notifications_event)
    assert sorted(str(p.relative_to(tmp_path)) for p in result.files) == [
        "data/a/b/bar.txt",
        "data/a/b/foo.txt",
        f"data/data/a/c/{UNICODE_NAME}",
    ]
    for path in result.files:
        assert hashlib.sha1(path.read_bytes()).hexdigest() == files[0]["hashsum"]


def test_wrong_hashsum_is_cart_failed_with_cartds_message(
    pacifica_stack: PacificaStack, file_ids: Iterator[int], tmp_path: Path
) -> None:
    obj = stored(pacifica_stack, file_ids, b"real content", "x.txt")
    obj["hashsum"] = hashlib.sha1(b"other content").hexdigest()
    with pytest.raises(CartFailedError, match="File hash does not match") as info:
        Downloader(tmp_path, pacifica_stack.cartd_url, delete_cart="wait").cloudevent(make_event([obj]))
    assert cart_gone(info.value.url)
    assert list(tmp_path.iterdir()) == []


def test_file_missing_from_archive_is_cart_failed(pacifica_stack: PacificaStack, tmp_path: Path) -> None:
    obj = file_obj(999_999, "ghost.txt", "", b"never stored")
    with pytest.raises(CartFailedError, match="Failed to pull file") as info:
        Downloader(tmp_path, pacifica_stack.cartd_url).cloudevent(make_event([obj]))
    assert list(tmp_path.iterdir()) == []
    # One clean sentence: the archive interface's traceback stays in the debug log.
    assert "Traceback" not in str(info.value)
    assert "No such file or directory" in str(info.value)
    assert len(str(info.value)) < 400


def test_cartapi_upstream_calls_against_real_cartd(
    pacifica_stack: PacificaStack, file_ids: Iterator[int]
) -> None:
    obj = stored(pacifica_stack, file_ids, b"abc", "abc.txt", "d")
    api = CartAPI(pacifica_stack.cartd_url)
    cart_url = api.setup_cart(
        lambda: iter(
            [{"id": str(obj["_id"]), "path": "d/abc.txt", "hashtype": "sha1", "hashsum": obj["hashsum"]}]
        )
    )
    assert api.wait_for_cart(cart_url, timeout=30) == cart_url
    assert api.cart_status(cart_url)[1] == "ready"
    assert api.delete_cart(cart_url)


@pytest.fixture
def service(pacifica_stack: PacificaStack, tmp_path: Path) -> Iterator[Client]:
    settings = settings_from_env(
        {},
        cartd_url=pacifica_stack.cartd_url,
        download_root=str(tmp_path),
        state_dir=str(tmp_path / ".state"),
    )
    app = create_app(settings)
    yield LocalClient(app)
    app.service.close()


def test_service_downloads_notifications_structured_and_binary_events(
    service: Client, pacifica_stack: PacificaStack, file_ids: Iterator[int]
) -> None:
    data = os.urandom(50_000)
    event = make_event([stored(pacifica_stack, file_ids, data, "f.bin", "run/1/")], event_id="n-1")
    resp = service.post("/", data=json.dumps(event), headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.data
    assert (Path(resp.json["download_path"]) / "data/run/1/f.bin").read_bytes() == data

    attributes = {"source": "/pacifica/metadata/ingest", "type": "org.pacifica.metadata.ingest"}
    structured = to_structured_event(SDKCloudEvent({**attributes, "id": "s-1"}, event["data"]))
    resp = service.post("/", data=structured.body, headers={"Content-Type": "application/cloudevents+json"})
    assert resp.status_code == 200, resp.data
    assert (Path(resp.json["download_path"]) / "data/run/1/f.bin").read_bytes() == data

    binary = to_binary_event(SDKCloudEvent({**attributes, "id": "b-1"}, {}))
    resp = service.post(
        "/", data=json.dumps(event["data"]), headers={**binary.headers, "content-type": "application/json"}
    )
    assert resp.status_code == 200, resp.data
    assert (Path(resp.json["download_path"]) / "data/run/1/f.bin").read_bytes() == data


def test_service_cart_failure_is_a_failed_job_and_leaves_no_directory(
    service: Client, pacifica_stack: PacificaStack, tmp_path: Path
) -> None:
    event = make_event([file_obj(999_998, "ghost.txt", "", b"x")])
    resp = service.post("/", data=json.dumps(event), headers={"Content-Type": "application/json"})
    assert resp.status_code == 200  # the event is safe; its job failed for good (a dead letter)
    assert resp.json["state"] == "failed"
    assert resp.json["error"] == "cart_failed"
    assert [p.name for p in tmp_path.iterdir()] == [".state"]


def test_cli_downloads_event_from_real_cartd(
    pacifica_stack: PacificaStack, file_ids: Iterator[int], tmp_path: Path
) -> None:
    data = os.urandom(10_000)
    event = make_event([stored(pacifica_stack, file_ids, data, "cli.bin", "x")])
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("downloader-service")),
            "download",
            "event",
            "-",
            str(tmp_path),
            "--json",
            "--cart-url",
            pacifica_stack.cartd_url,
        ],
        input=json.dumps(event),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files"] == 1
    assert (tmp_path / "data/x/cli.bin").read_bytes() == data


class _CutFirstBody(requests.adapters.HTTPAdapter):
    """A transport that breaks the body of the first whole cart GET after ``cut`` bytes."""

    def __init__(self, cut: int) -> None:
        super().__init__()
        self.cut = cut
        self.gets: list[tuple[str, int, str]] = []  # (Range asked, status, Accept-Ranges)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        resp = super().send(request, **kwargs)
        if request.method == "GET":
            self.gets.append(
                (
                    str(request.headers.get("Range", "")),
                    resp.status_code,
                    resp.headers.get("Accept-Ranges", ""),
                )
            )
            if len(self.gets) == 1:
                resp.raw = _CutRaw(resp.raw, self.cut)
        return resp


class _CutRaw:
    """A urllib3 response that fails like a dropped connection after ``cut`` bytes."""

    def __init__(self, raw: Any, cut: int) -> None:
        self._raw = raw
        self._left = cut

    def read(self, amt: int | None = None, **kwargs: Any) -> bytes:
        if self._left <= 0:
            raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")
        data: bytes = self._raw.read(min(amt or self._left, self._left), **kwargs)
        self._left -= len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def test_bundled_cart_downloads_verifies_and_resumes_with_range(
    pacifica_stack: PacificaStack, file_ids: Iterator[int], tmp_path: Path
) -> None:
    datas = [os.urandom(400_000) for _ in range(5)]
    files = [stored(pacifica_stack, file_ids, data, f"f{i}.bin", "b") for i, data in enumerate(datas)]
    session = requests.Session()
    transport = _CutFirstBody(cut=1_700_000)  # inside the fifth file
    session.mount("http://", transport)
    downloader = Downloader(tmp_path, pacifica_stack.cartd_url, session=session, bundle=True)
    result = downloader.cloudevent(make_event(files))
    for i, data in enumerate(datas):
        assert (tmp_path / f"data/b/f{i}.bin").read_bytes() == data
    assert result.bytes == 2_000_000
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # neither the uid nor staging
    # Cartd served the bundle as a static file, and answered the resume with 206.
    assert transport.gets[0] == ("", 200, "bytes")
    assert transport.gets[1][0].startswith("bytes=") and transport.gets[1][1] == 206
    assert len(transport.gets) == 2
    assert downloader.wait_for_deletes(30)
