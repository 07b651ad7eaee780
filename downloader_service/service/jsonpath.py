"""Subscription rules: JSONPath parsed and matched by jsonpath2, as Notifications does.

Notifications (pacifica-notifications 0.5.2) routes an event to a subscription when the
subscription's rule finds anything in the event (``jsonpath2`` 0.4.x). The settings check
``DOWNLOADER_SUBSCRIPTION_JSONPATH`` with the same parser, and ``jobs import`` keeps only the
events the rule matches, so a replay takes what Notifications would have routed.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any


def compile_jsonpath(rule: str) -> Any:
    """``rule`` parsed by jsonpath2, the library Notifications matches subscriptions with.

    A rule it cannot parse raises ``ValueError`` naming it (antlr's own report on stderr is
    swallowed: the message says it all).
    """
    from jsonpath2.path import Path

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return Path.parse_str(rule)
    except Exception as exc:  # noqa: BLE001 - antlr raises what it likes for a bad rule
        raise ValueError(f"DOWNLOADER_SUBSCRIPTION_JSONPATH {rule!r} is not a JSONPath rule: {exc}") from None


def matches(rule: Any, event: Any) -> bool:
    """Whether Notifications would route ``event`` to a subscription with ``rule`` (its ``find``)."""
    try:
        return any(True for _ in rule.match(event))
    except Exception:  # noqa: BLE001 - jsonpath2 fails on shapes it does not expect: no match
        return False
