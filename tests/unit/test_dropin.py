"""The drop-in ``pacifica.downloader`` (dropin/): upstream 0.4.1's API over this project's library."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pacifica.downloader
import pytest
from pacifica.downloader import CartAPI, Downloader

import downloader_service
from downloader_service import (
    CartFailedError,
    CartTimeoutError,
    HashMismatchError,
    InvalidEventError,
    InvalidInputError,
    UnsafeArchiveError,
)
from tests.events import file_obj, make_event
from tests.fakecartd import FakeCartd, Member, build_tar, sha1

REPO = Path(__file__).resolve().parents[2]
FOO = b"The data for file 1100.\n"
BAR = "bar\u00e9\n".encode()


@pytest.fixture
def cartd(fake_cartd: FakeCartd) -> FakeCartd:
    fake_cartd.add(1100, FOO)
    fake_cartd.add(1101, BAR)
    return fake_cartd


def dispatcher_files() -> list[dict[str, Any]]:
    """What pacifica-dispatcher's ``yield_files`` yields: ids as ints, paths joined."""
    return [
        {"id": 1100, "hashsum": sha1(FOO), "hashtype": "sha1", "path": "a/b/foo.txt"},
        {"id": 1101, "hashsum": sha1(BAR), "hashtype": "sha1", "path": "a/b/\u00e9/bar\u00e9.txt"},
    ]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_upstream_modules_import_and_pacifica_stays_a_namespace() -> None:
    import pacifica
    from pacifica.downloader import cartapi, cloudevent, downloader, policy

    assert getattr(pacifica, "__file__", None) is None  # PEP 420: no pacifica/__init__.py of ours
    assert not (REPO / "dropin/pacifica/__init__.py").exists()
    assert downloader.Downloader is Downloader and cartapi.CartAPI is CartAPI
    assert cloudevent.CloudEvent is downloader_service.CloudEvent
    assert policy.TransactionInfo is downloader_service.TransactionInfo
    assert pacifica.downloader.__all__ == sorted(pacifica.downloader.__all__)


def test_dropin_never_imports_the_cloudevents_sdk() -> None:
    # cloudevents-python (pacifica-dispatcher's) overwrites the SDK's cloudevents/__init__.py.
    code = (
        "import sys, pacifica.downloader, pacifica.downloader.downloader;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cloudevents', 'cherrypy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cart_api_url_from_upstream_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CARTD_CART_API_URL", "CARTD_PROTO", "CARTD_ADDR", "CARTD_PORT", "CARTD_URL"):
        monkeypatch.delenv(name, raising=False)
    assert (
        Downloader(proto="http", addr="127.0.0.1", port=8081).cart_api.cart_api_url == "http://127.0.0.1:8081"
    )
    assert Downloader().cart_api.cart_api_url == "http://127.0.0.1:8081"
    assert Downloader(cart_api_url="https://cartd/api/").cart_api.cart_api_url == "https://cartd/api"
    monkeypatch.setenv("CARTD_ADDR", "cartd.example")
    monkeypatch.setenv("CARTD_PORT", "9000")
    assert CartAPI(proto="https").cart_api_url == "https://cartd.example:9000"
    monkeypatch.setenv("CARTD_CART_API_URL", "http://from-env:1")
    assert CartAPI(port=2).cart_api_url == "http://from-env:1"
    assert CartAPI(cart_api_url="http://given:3").cart_api_url == "http://given:3"


def test_auth_dict_is_kept_as_upstream_exposes_it() -> None:
    auth = {"cert": ("/c.pem", "/k.pem"), "verify": False}
    downloader = Downloader(cart_api_url="http://127.0.0.1:1", auth=auth)
    assert downloader.cart_api.auth == auth


@pytest.mark.parametrize("shape", ["generator function", "generator", "list"])
def test_dispatcher_call_downloads_and_verifies(tmp_path: Path, cartd: FakeCartd, shape: str) -> None:
    downloader = Downloader(cart_api_url=cartd.url)

    def yield_files() -> Iterator[dict[str, Any]]:
        yield from dispatcher_files()

    given: Any = {"generator function": yield_files, "generator": yield_files(), "list": dispatcher_files()}
    # pacifica-dispatcher 0.2.5, downloader_runners.py, verbatim but for the names:
    result = downloader._download_from_url(
        str(tmp_path),
        downloader.cart_api.wait_for_cart(downloader.cart_api.setup_cart(given[shape]), 180),
        "data",
    )
    assert (tmp_path / "data/a/b/foo.txt").read_bytes() == FOO
    assert (tmp_path / "data/a/b/\u00e9/bar\u00e9.txt").read_bytes() == BAR
    assert sorted(result.files.names) == ["a/b/foo.txt", "a/b/\u00e9/bar\u00e9.txt"]
    assert downloader.wait_for_deletes(5)
    assert cartd.deleted == list(cartd.carts)  # the cart it set up is deleted afterwards


def test_dispatcher_call_refuses_a_file_whose_checksum_differs(tmp_path: Path, cartd: FakeCartd) -> None:
    cartd.contents["1101"] = b"changed on the way\n"
    downloader = Downloader(cart_api_url=cartd.url)
    cart_url = downloader.cart_api.wait_for_cart(downloader.cart_api.setup_cart(dispatcher_files), 180)
    with pytest.raises(HashMismatchError):
        downloader._download_from_url(str(tmp_path), cart_url, "data")
    assert listing(tmp_path) == []  # nothing half-written: not even the good file


def test_dispatcher_call_refuses_a_file_the_cart_did_not_ask_for(tmp_path: Path, cartd: FakeCartd) -> None:
    cartd.body = lambda cart, filename: [
        build_tar([Member("data/a/b/foo.txt", FOO), Member("data/a/b/extra.txt", b"x")])
    ]
    downloader = Downloader(cart_api_url=cartd.url)
    cart_url = downloader.cart_api.setup_cart(dispatcher_files()[:1])
    with pytest.raises(UnsafeArchiveError):
        downloader._download_from_url(str(tmp_path), cart_url, "data")
    assert listing(tmp_path) == []


def test_a_cart_made_elsewhere_is_still_filtered(tmp_path: Path, cartd: FakeCartd) -> None:
    # Not set up by this downloader: nothing to verify against, but unsafe members are refused.
    cartd.body = lambda cart, filename: [build_tar([Member("data/../../escape.txt", b"x")])]
    other = CartAPI(cart_api_url=cartd.url)
    cart_url = other.setup_cart(dispatcher_files()[:1])
    downloader = Downloader(cart_api_url=cartd.url)
    with pytest.raises(UnsafeArchiveError):
        downloader._download_from_url(str(tmp_path), cart_url, "data")
    assert not (tmp_path.parent / "escape.txt").exists()
    assert cartd.deleted == []  # someone else's cart is left alone


def test_upstream_cloudevent_and_transactioninfo_calls(tmp_path: Path, cartd: FakeCartd) -> None:
    downloader = Downloader(cart_api_url=cartd.url)
    event = make_event([file_obj(1100, "foo.txt", "a/b", FOO), file_obj(1101, "bar.txt", "", BAR)])
    result = downloader.cloudevent(str(tmp_path / "one"), event)
    assert (tmp_path / "one/data/a/b/foo.txt").read_bytes() == FOO
    assert result.file_count == 2
    downloader.cloudevent(location=tmp_path / "two", cloudevent=event, filename="here", timeout="30")
    assert (tmp_path / "two/here/bar.txt").read_bytes() == BAR
    transinfo = {
        "files": {"1100": {"name": "foo.txt", "subdir": "a/b/", "hashtype": "sha1", "hashsum": sha1(FOO)}}
    }
    downloader.transactioninfo(str(tmp_path / "three"), transinfo, filename="data")
    assert listing(tmp_path / "three") == [
        "data",
        "data/a",
        "data/a/b",
        "data/a/b/foo.txt",
    ]  # no a/b//foo.txt


def test_upstream_calls_with_wrong_arguments_are_type_errors(tmp_path: Path, cartd: FakeCartd) -> None:
    downloader = Downloader(cart_api_url=cartd.url)
    event = make_event([file_obj(1100, "foo.txt", "", FOO)])
    with pytest.raises(TypeError, match="missing required argument"):
        downloader.cloudevent(str(tmp_path))
    with pytest.raises(TypeError, match="unexpected keyword argument 'filname'"):
        downloader.cloudevent(str(tmp_path), event, filname="x")
    with pytest.raises(TypeError, match="multiple values"):
        downloader.cloudevent(str(tmp_path), event, cloudevent=event)
    with pytest.raises(TypeError, match="generator function or an iterable"):
        downloader.cart_api.setup_cart({"id": 1})
    assert cartd.requests == []


def test_a_bad_file_refuses_the_cart_before_anything_is_sent(cartd: FakeCartd) -> None:
    files = [*dispatcher_files(), {"id": False, "path": "/etc/passwd", "hashsum": False, "hashtype": False}]
    with pytest.raises(InvalidInputError):
        CartAPI(cart_api_url=cartd.url).setup_cart(lambda: iter(files))
    with pytest.raises(InvalidEventError):  # upstream sent "False" values on to Cartd
        pacifica.downloader.CloudEvent.yield_files({"data": [{"destinationTable": "Files", "name": "x"}]})
    assert cartd.requests == []


def test_errors_replace_upstreams_asserts(cartd: FakeCartd) -> None:
    api = CartAPI(cart_api_url=cartd.url, poll_interval=0.01)
    cartd.post_status = 400
    with pytest.raises(CartFailedError, match="400"):
        api.setup_cart(dispatcher_files)
    cartd.post_status = 201
    cartd.head = lambda cart: (202, "staging", "")
    with pytest.raises(CartTimeoutError, match=r"not ready within 0\.1 s"):
        api.wait_for_cart(api.setup_cart(dispatcher_files), 0.1)
    assert not issubclass(CartTimeoutError, AssertionError)


def test_extra_args_may_ask_for_a_bundle_only(tmp_path: Path, cartd: FakeCartd) -> None:
    downloader = Downloader(cart_api_url=cartd.url, extra_args={"bundle": True})
    cart_url = downloader.cart_api.wait_for_cart(downloader.cart_api.setup_cart(dispatcher_files))
    assert cartd.carts[cart_url.rsplit("/", 1)[1]].bundle
    downloader._download_from_url(tmp_path, cart_url, "data")  # a bundle's top directory is its uid
    assert (tmp_path / "data/a/b/foo.txt").read_bytes() == FOO
    with pytest.raises(TypeError, match="extra_args may carry only"):
        CartAPI(extra_args={"priority": 1})


def test_dropin_distribution_matches_the_library() -> None:
    tree = ast.parse((REPO / "dropin/setup.py").read_text(encoding="utf-8"))
    version = next(
        node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "VERSION" for t in node.targets)
        and isinstance(node.value, ast.Constant)
    )
    assert version == downloader_service.__version__
    # pacifica-cli 0.5.2 requires pacifica-downloader>=0.4.1: the drop-in must satisfy that.
    assert tuple(int(part) for part in version.split(".")) >= (0, 4, 1)
    metadata = subprocess.run(
        [sys.executable, "-m", "pip", "show", "pacifica-downloader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"Version: {version}" in metadata
    assert "Requires: pacifica-downloader-service" in metadata
    assert json.dumps(pacifica.downloader.__file__).count("dropin") == 1


def test_carts_are_forgotten_once_downloaded_or_failed(tmp_path: Path, cartd: FakeCartd) -> None:
    downloader = Downloader(cart_api_url=cartd.url, poll_interval=0.01)
    api = downloader.cart_api
    assert isinstance(api, CartAPI)
    event = make_event([file_obj(1100, "foo.txt", "", FOO)])
    downloader.cloudevent(str(tmp_path / "one"), event)  # download() sets up a cart through cart_api
    cart_url = api.setup_cart(dispatcher_files)
    downloader._download_from_url(str(tmp_path / "two"), api.wait_for_cart(cart_url), "data")
    cartd.head = lambda cart: (500, "error", "no such file")
    with pytest.raises(CartFailedError):
        api.wait_for_cart(api.setup_cart(dispatcher_files))
    assert api.planned_files(cart_url) is None
    assert not api._carts  # nothing held for carts that are done with
