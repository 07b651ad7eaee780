"""The retry policy: after a failed attempt, retry in how many seconds, or not at all."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DownloaderError, HashMismatchError
from .jobs import ErrorKind


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, for a window of time after the event arrived.

    Attempt ``n`` (1-based) that failed is followed by a pause of ``base * 2**(n-1)`` seconds,
    at most ``max_delay``, of which the upper half is random so that many jobs failing
    together (Cartd down) do not come back together. Errors whose ``retryable`` is false end
    the job at once, except a checksum mismatch, which gets one fresh cart: a byte flipped on
    the way is worth one more try, a wrong ``hashsum`` in the metadata is not worth two.
    """

    base: float = 5.0
    max_delay: float = 900.0
    window: float = 86400.0
    random: Callable[[], float] = field(default=random.random, compare=False)

    def delay(
        self, attempts: int, error: BaseException, age: float, previous_kind: str | None = None
    ) -> float | None:
        """Seconds until the next attempt, or ``None`` when the job has failed for good.

        ``attempts`` is how many attempts have run, ``age`` the seconds since the event was
        accepted, ``previous_kind`` the error kind of the attempt before this one.
        """
        if not self.worth_retrying(error, previous_kind):
            return None
        full = min(self.max_delay, self.base * 2.0 ** max(0, attempts - 1))
        pause = full / 2 + self.random() * full / 2
        if age + pause > self.window:
            return None
        return pause

    @staticmethod
    def worth_retrying(error: BaseException, previous_kind: str | None = None) -> bool:
        """Whether another attempt can succeed where this one failed."""
        if isinstance(error, HashMismatchError):
            return previous_kind != ErrorKind.INTEGRITY
        if isinstance(error, DownloaderError):
            return error.retryable
        # Anything else is our own bug or an environment problem (database, memory): retry.
        return True
