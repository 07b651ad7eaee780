from __future__ import annotations

import json
import os

import pytest
import requests
import urllib3.response

from downloader_service import (
    CartAPI,
    CartFailedError,
    CartGoneError,
    CartTimeoutError,
    CartUnavailableError,
    DownloadInterruptedError,
    InvalidInputError,
)
from downloader_service.cartapi import connection_problem
from downloader_service.cartfile import CartdFile
from tests.fakecartd import Cart, FakeCartd, cart_tar, closed_port, sha1


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


def one_file() -> list[CartdFile]:
    return [{"id": "1", "path": "x.txt", "hashtype": "sha1", "hashsum": sha1(b"x")}]


def test_setup_cart_posts_fileids_and_returns_cart_url(fake_cartd: FakeCartd) -> None:
    api = CartAPI(fake_cartd.url + "/")
    cart_url = api.setup_cart(lambda: iter(one_file()))
    uid = cart_url.rsplit("/", 1)[1]
    assert cart_url == f"{fake_cartd.url}/{uid}"
    assert fake_cartd.carts[uid].fileids == one_file()


@pytest.mark.parametrize("count", [999, 1000, 2501])
def test_setup_cart_posts_every_file_across_encoding_batches(fake_cartd: FakeCartd, count: int) -> None:
    # The body is encoded 1000 files at a time: none may be lost or doubled at a boundary.
    fileids = [
        {"id": str(i), "path": f"d/{i}.bin", "hashtype": "sha1", "hashsum": sha1(b"%d" % i)}
        for i in range(count)
    ]
    cart_url = CartAPI(fake_cartd.url).setup_cart(lambda: iter(fileids), bundle=True)
    cart = fake_cartd.carts[cart_url.rsplit("/", 1)[1]]
    assert cart.fileids == fileids
    assert cart.bundle


def test_setup_cart_validates_what_yield_files_yields(fake_cartd: FakeCartd) -> None:
    bad = [{"id": "1", "path": "../x", "hashtype": "sha1", "hashsum": sha1(b"x")}]
    with pytest.raises(InvalidInputError, match=r"'\.\.'"):
        CartAPI(fake_cartd.url).setup_cart(lambda: iter(bad))
    assert fake_cartd.requests == []


@pytest.mark.parametrize(("status", "error"), [(400, CartFailedError), (503, CartUnavailableError)])
def test_setup_cart_refused_raises_with_message(fake_cartd: FakeCartd, status: int, error: type) -> None:
    fake_cartd.post_status = status
    with pytest.raises(error, match="Cart Processing has begun") as info:
        CartAPI(fake_cartd.url).setup_cart(lambda: iter(one_file()))
    assert info.value.status == status


def test_setup_cart_unreachable_is_retryable_unavailable() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(CartUnavailableError, match="cannot reach Cartd") as info:
        CartAPI(url).setup_cart(lambda: iter(one_file()))
    assert info.value.retryable
    assert info.value.url.startswith(url)
    assert isinstance(info.value.__cause__, requests.ConnectionError)


def test_wait_for_cart_polls_fast_then_in_proportion_to_the_wait(fake_cartd: FakeCartd) -> None:
    clock = FakeClock()
    start = clock.now
    # Ready after 60 s of staging.
    fake_cartd.head = lambda cart: (204, "ready", "") if clock.now - start >= 60 else (202, "staging", "")
    api = CartAPI(fake_cartd.url, clock=clock, sleep=clock.sleep)
    cart_url = api.setup_cart(lambda: iter(one_file()))
    seen: list[str] = []
    assert api.wait_for_cart(cart_url, on_status=lambda status, _msg: seen.append(status)) == cart_url
    assert clock.sleeps[:51] == [0.02] * 51  # the first second: every 20 ms
    assert clock.sleeps[51] == pytest.approx(0.0204)  # then 2 % of the time waited
    assert max(clock.sleeps) == 0.25  # a ready cart never waits long
    assert clock.now - start - 60 < 0.25  # "ready" seen within one pause of it
    assert len(clock.sleeps) < 400  # 60 s of staging cost under 400 polls
    assert seen[-1] == "ready"
    assert set(seen[:-1]) == {"staging"}


def test_wait_for_cart_error_raises_cartd_message(fake_cartd: FakeCartd) -> None:
    fake_cartd.head = lambda cart: (500, "error", "hashsum mismatch for file 1")
    api = CartAPI(fake_cartd.url)
    cart_url = api.setup_cart(lambda: iter(one_file()))
    with pytest.raises(CartFailedError, match="hashsum mismatch for file 1") as info:
        api.wait_for_cart(cart_url)
    assert info.value.cartd_message == "hashsum mismatch for file 1"
    assert not info.value.retryable


def test_wait_for_cart_never_ready_times_out_at_deadline(fake_cartd: FakeCartd) -> None:
    fake_cartd.head = lambda cart: (202, "staging", "")
    clock = FakeClock()
    api = CartAPI(fake_cartd.url, clock=clock, sleep=clock.sleep)
    cart_url = api.setup_cart(lambda: iter(one_file()))
    with pytest.raises(CartTimeoutError, match="not ready within 3 s") as info:
        api.wait_for_cart(cart_url, timeout=3)
    assert info.value.retryable
    assert sum(clock.sleeps) == pytest.approx(3.0)


def test_wait_for_cart_unknown_cart_fails_at_once_as_gone_and_retryable(fake_cartd: FakeCartd) -> None:
    with pytest.raises(CartGoneError, match="404") as info:
        CartAPI(fake_cartd.url).wait_for_cart(f"{fake_cartd.url}/nope", timeout=5)
    assert isinstance(info.value, CartFailedError)
    assert info.value.retryable  # Cartd purged it: a new cart may work


def test_open_cart_purged_between_ready_and_get_is_gone(fake_cartd: FakeCartd) -> None:
    api = CartAPI(fake_cartd.url)
    cart_url = api.setup_cart(lambda: iter(one_file()))
    fake_cartd.get_status = 404
    with pytest.raises(CartGoneError, match="404"), api.open_cart(cart_url):
        pass


def test_requests_carry_upstream_auth_dict(fake_cartd: FakeCartd) -> None:
    session = requests.Session()
    sent: list[requests.PreparedRequest] = []
    session.hooks["response"].append(lambda resp, **_kw: sent.append(resp.request))
    api = CartAPI(fake_cartd.url, session=session, auth={"auth": ("user", "pw"), "headers": {"X-Test": "1"}})
    api.wait_for_cart(api.setup_cart(lambda: iter(one_file())))
    assert [r.method for r in sent] == ["POST", "HEAD"]
    assert all(r.headers["Authorization"].startswith("Basic ") for r in sent)
    assert all(r.headers["X-Test"] == "1" for r in sent)
    assert sent[0].headers["Content-Type"] == "application/json"
    # The body is encoded as it is sent (never held whole), with its length announced.
    body = b"".join(sent[0].body)  # type: ignore[arg-type]
    assert sent[0].headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in sent[0].headers
    assert json.loads(body)["fileids"] == one_file()


def test_plain_auth_tuple_is_accepted(fake_cartd: FakeCartd) -> None:
    assert CartAPI(fake_cartd.url, auth=("u", "p")).auth == {"auth": ("u", "p")}


def test_unknown_kwargs_are_an_error() -> None:
    with pytest.raises(TypeError, match="colour"):
        CartAPI("http://127.0.0.1:1", colour="red")


def test_open_cart_read_timeout_becomes_interrupted(fake_cartd: FakeCartd) -> None:
    import time

    def stall(cart: Cart, filename: str):  # type: ignore[no-untyped-def]
        yield b"x" * 100
        time.sleep(1.0)
        yield b"y"

    fake_cartd.body = stall
    api = CartAPI(fake_cartd.url, read_timeout=0.2)
    cart_url = api.setup_cart(lambda: iter(one_file()))

    def drain() -> None:
        with api.open_cart(cart_url) as stream:
            while stream.read(50):
                pass

    with pytest.raises(DownloadInterruptedError, match="after 100 bytes"):
        drain()


def _stored_cart(fake: FakeCartd, bundle: bool) -> tuple[CartAPI, str, bytes]:
    """A cart of one 300 kB file on ``fake``, and the exact tar its GET sends."""
    file = fake.add("1", os.urandom(300_000))
    file["path"] = "x.bin"
    api = CartAPI(fake.url)
    cart_url = api.setup_cart(lambda: iter([file]), bundle=bundle)
    uid = cart_url.rpartition("/")[2]
    return api, cart_url, cart_tar(fake.carts[uid].fileids, fake.contents, uid if bundle else "data")


@pytest.mark.parametrize("bundle", [False, True], ids=["chunked tar", "sized bundle"])
def test_open_cart_readinto_goes_around_urllib3s_copies_and_gives_every_byte(
    fake_cartd: FakeCartd, monkeypatch: pytest.MonkeyPatch, bundle: bool
) -> None:
    fake_cartd.chunk = 1000  # many small chunks: one readinto must fill across them
    api, cart_url, expected = _stored_cart(fake_cartd, bundle)

    def copying_read(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("urllib3's read (two copies a chunk) was used")

    monkeypatch.setattr(urllib3.response.HTTPResponse, "read", copying_read)
    got, buffer = bytearray(), bytearray(64 << 10)
    with api.open_cart(cart_url) as stream:
        while count := stream.readinto(memoryview(buffer)):
            got += buffer[:count]
    assert got == expected
    assert stream.bytes_read == len(expected)


def test_open_cart_readinto_of_a_bundle_cut_short_is_an_interruption(fake_cartd: FakeCartd) -> None:
    api, cart_url, expected = _stored_cart(fake_cartd, bundle=True)
    fake_cartd.bundle_cuts = [100_000]
    buffer = memoryview(bytearray(64 << 10))

    def drain() -> None:
        with api.open_cart(cart_url) as stream:
            while stream.readinto(buffer):
                pass

    with pytest.raises(DownloadInterruptedError, match=f"ended after 100000 of {len(expected)} bytes"):
        drain()


def test_open_cart_error_status_raises(fake_cartd: FakeCartd) -> None:
    api = CartAPI(fake_cartd.url)
    cart_url = api.setup_cart(lambda: iter(one_file()))
    fake_cartd.get_status = 503
    with pytest.raises(CartUnavailableError, match="503"), api.open_cart(cart_url):
        pass


def test_delete_cart_reports_success_and_swallows_failure(fake_cartd: FakeCartd) -> None:
    api = CartAPI(fake_cartd.url)
    assert api.delete_cart(f"{fake_cartd.url}/abc")
    assert fake_cartd.deleted == ["abc"]
    assert not CartAPI(f"http://127.0.0.1:{closed_port()}").delete_cart(f"http://127.0.0.1:{closed_port()}/x")


def test_default_url_comes_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARTD_URL", "http://cartd.example:9000/")
    assert CartAPI().cart_api_url == "http://cartd.example:9000"
    monkeypatch.delenv("CARTD_URL")
    assert CartAPI().cart_api_url == "http://127.0.0.1:8081"


def test_long_cartd_message_is_shortened(fake_cartd: FakeCartd) -> None:
    fake_cartd.head = lambda cart: (500, "error", "Failed to pull file(" + "x" * 5000 + ")")
    api = CartAPI(fake_cartd.url)
    cart_url = api.setup_cart(lambda: iter(one_file()))
    with pytest.raises(CartFailedError, match="Failed to pull file") as info:
        api.wait_for_cart(cart_url)
    assert len(info.value.cartd_message) == 1000
    assert info.value.cartd_message.endswith("…")


def test_cartd_message_with_a_traceback_becomes_one_sentence() -> None:
    from downloader_service.cartapi import clean_cartd_message

    raw = (
        'Failed to pull file(Failed to stage with error: "{\\"status\\": \\"500 Internal Server Error\\", '
        '\\"traceback\\": \\"Traceback (most recent call last):\\\\n  File \\\\\\"/x/archive.py\\\\\\", '
        "line 54, in open\\\\n    self._file = factory(path)\\\\nFileNotFoundError: [Errno 2] No such file: "
        "'/srv/999'\\\\n\\\"}\")"
    )
    assert (
        clean_cartd_message(raw)
        == "Failed to pull file: FileNotFoundError: [Errno 2] No such file: '/srv/999'"
    )
    assert clean_cartd_message("staging failed") == "staging failed"


def test_unreachable_cartd_is_said_in_a_few_words_not_urllib3s() -> None:
    with pytest.raises(CartUnavailableError) as info:
        CartAPI(f"http://127.0.0.1:{closed_port()}").setup_cart(lambda: iter(one_file()))
    assert str(info.value).endswith(": connection refused")
    assert "HTTPConnectionPool" not in str(info.value)


@pytest.mark.parametrize("code", [400, 401, 403])
def test_wait_for_cart_ends_at_a_refusal(fake_cartd: FakeCartd, code: int) -> None:
    # A TLS terminator wanting another client certificate answers 400: waiting cannot help.
    fake_cartd.head = lambda cart: (code, "", "")
    api = CartAPI(fake_cartd.url, poll_interval=0.01)
    with pytest.raises(CartFailedError, match=f"Cartd answered {code}"):
        api.wait_for_cart(api.setup_cart(lambda: iter(one_file())), 30)
    assert len([verb for verb, _ in fake_cartd.requests if verb == "HEAD"]) == 1


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
            "certificate (_ssl.c:1006)",
            "the server's TLS certificate is not trusted (unable to get local issuer certificate)",
        ),
        ("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required", "requires a client"),
        ("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca", "the server refused our client certificate"),
        ("[SSL: WRONG_VERSION_NUMBER] wrong version number", "no TLS at the other end"),
    ],
)
def test_connection_problem_names_tls_failures(raw: str, words: str) -> None:
    exc = requests.exceptions.SSLError(
        f"HTTPSConnectionPool(host='x', port=1): (Caused by SSLError({raw!r}))"
    )
    assert words in connection_problem(exc)
