from __future__ import annotations

import pytest

from downloader_service.errors import (
    CartFailedError,
    CartGoneError,
    CartTimeoutError,
    CartUnavailableError,
    DownloadInterruptedError,
    HashMismatchError,
    LocalStorageError,
    MissingFileError,
    UnsafeArchiveError,
)
from downloader_service.service.retry import RetryPolicy


def policy(random: float = 0.0, **kwargs: float) -> RetryPolicy:
    return RetryPolicy(random=lambda: random, **kwargs)


def test_delay_doubles_from_the_base_up_to_the_cap() -> None:
    lowest = policy(0.0, base=5, max_delay=60)
    error = CartUnavailableError("down")
    assert [lowest.delay(n, error, age=0) for n in range(1, 7)] == [2.5, 5, 10, 20, 30, 30]
    highest = policy(0.999999, base=5, max_delay=60)
    assert highest.delay(1, error, age=0) == pytest.approx(5, abs=1e-4)
    assert highest.delay(10, error, age=0) == pytest.approx(60, abs=1e-3)


def test_jitter_spreads_retries_over_the_upper_half() -> None:
    delays = {policy(r, base=8).delay(1, CartUnavailableError("down"), age=0) for r in (0.0, 0.5, 0.99)}
    assert delays == {4.0, 6.0, 7.96}


def test_no_retry_after_the_window() -> None:
    rules = policy(0.0, base=10, max_delay=100, window=60)
    error = CartTimeoutError("slow")
    assert rules.delay(1, error, age=50) == 5
    assert rules.delay(1, error, age=56) is None


@pytest.mark.parametrize(
    "error",
    [
        CartUnavailableError("down"),
        CartTimeoutError("staging"),
        CartGoneError("purged"),
        DownloadInterruptedError("cut"),
        MissingFileError("gone"),
        LocalStorageError("full"),
        RuntimeError("a bug or the database"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transient_errors_are_retried(error: Exception) -> None:
    assert policy().delay(3, error, age=0) is not None


@pytest.mark.parametrize(
    "error",
    [
        UnsafeArchiveError("a link"),
        CartFailedError("the archive has no such file"),
        LocalStorageError("a symlink in the way", retryable=False),
    ],
    ids=["unsafe", "cart-failed", "storage-not-retryable"],
)
def test_errors_a_retry_cannot_fix_end_the_job(error: Exception) -> None:
    assert policy().delay(1, error, age=0) is None


def test_checksum_mismatch_gets_one_fresh_cart() -> None:
    error = HashMismatchError("sha1 differs")
    assert policy().delay(1, error, age=0, previous_kind=None) is not None
    assert policy().delay(2, error, age=0, previous_kind="cartd_unavailable") is not None
    assert policy().delay(2, error, age=0, previous_kind="integrity") is None
