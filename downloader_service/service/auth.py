"""Who may do what: the sender posts events, operators read and change jobs; browsers must mean it.

Two credentials, two surfaces:

- **the sender's** (``DOWNLOADER_TOKEN`` / ``DOWNLOADER_BASIC_AUTH``): ``POST /``. Pacifica
  Notifications keeps it in its database in clear, so it opens nothing else.
- **the operators'** (``DOWNLOADER_ADMIN_TOKEN`` / ``DOWNLOADER_ADMIN_BASIC_AUTH``): ``/jobs``,
  retry and delete, the jobs page, and the whole ``/health/ready`` report (paths and URLs
  included). A sender credential there is a 403. With no operator credential set, the operator
  surface answers only clients on this host (loopback): a fresh install is not open to the
  network, and the command line (``downloader-service jobs ...``) works on the store anyway.

Cross-site requests: a browser sends basic credentials by itself, so a page elsewhere could
retry or delete jobs. A request that changes something and comes from a browser must come from
this service's own page: ``Sec-Fetch-Site`` ``same-origin`` (or ``none``, typed by the user),
and an ``Origin``, when there is one, on our host. Clients that send neither (the CLI,
curl, Notifications) are not browsers and pass.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .settings import Settings

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SAME_SITE = frozenset({"same-origin", "none"})


class Denied(Exception):
    """An answer decided before the request's work: its status, kind, detail and headers."""

    def __init__(self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers = status, kind, detail, headers or {}


@dataclass(frozen=True)
class Credential:
    """A bearer token and/or ``user:password`` for basic auth; empty means none."""

    token: str = ""
    basic: str = ""

    def __bool__(self) -> bool:
        return bool(self.token or self.basic)

    def given(self, headers: Mapping[str, str], params: Mapping[str, Any]) -> bool:
        """Whether the request carries this credential (a header, or ``?access_token=``)."""
        scheme, _, value = headers.get("Authorization", "").partition(" ")
        scheme = scheme.lower()
        if self.token:
            token = value.strip() if scheme == "bearer" else params.get("access_token", "")
            if isinstance(token, str) and token and hmac.compare_digest(token.encode(), self.token.encode()):
                return True
        if self.basic and scheme == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(decoded, self.basic.encode())
        return False

    def challenges(self) -> list[str]:
        return (['Bearer realm="downloader"'] if self.token else []) + (
            ['Basic realm="downloader"'] if self.basic else []
        )


class Access:
    """The rules above, for one service's settings."""

    def __init__(self, settings: Settings) -> None:
        self.sender = Credential(settings.token, settings.basic_auth)
        self.operator = Credential(settings.admin_token, settings.admin_basic_auth)

    def check_sender(self, headers: Mapping[str, str], params: Mapping[str, Any]) -> None:
        """Refuse ``POST /`` without the sender's credential (when one is set): 401."""
        if self.sender and not self.sender.given(headers, params):
            raise self._unauthorized(self.sender)

    def is_operator(self, headers: Mapping[str, str], params: Mapping[str, Any], remote: str) -> bool:
        """Whether the request may use the operator surface."""
        if self.operator:
            return self.operator.given(headers, params)
        return is_loopback(remote)

    def check_operator(self, headers: Mapping[str, str], params: Mapping[str, Any], remote: str) -> None:
        """Refuse the operator surface: 401 without its credential, 403 with the sender's."""
        if self.is_operator(headers, params, remote):
            return
        if not self.operator:
            raise Denied(
                403,
                "forbidden",
                "the jobs API and page answer only this host until DOWNLOADER_ADMIN_TOKEN or "
                "DOWNLOADER_ADMIN_BASIC_AUTH is set",
            )
        if self.sender and self.sender.given(headers, params):
            raise Denied(403, "forbidden", "this credential may post events only; operators have their own")
        raise self._unauthorized(self.operator)

    @staticmethod
    def _unauthorized(credential: Credential) -> Denied:
        return Denied(
            401,
            "unauthorized",
            "valid credentials are required",
            {"WWW-Authenticate": ", ".join(credential.challenges())},
        )


def check_same_origin(method: str, headers: Mapping[str, str], own_origin: str) -> None:
    """Refuse a browser's state-changing request that another site made it send: 403."""
    if method.upper() in _SAFE_METHODS:
        return
    site = headers.get("Sec-Fetch-Site", "").strip().lower()
    if site and site not in _SAME_SITE:
        raise Denied(403, "cross_site", f"a {site} request may not change anything here")
    origin = headers.get("Origin", "").strip()
    if origin.lower() == "null":
        raise Denied(403, "cross_site", "requests from an opaque origin may not change anything here")
    # The host only: behind a TLS proxy the page is https://host while we see http://host. A
    # page on another port of the same host is "same-site", which the check above refuses.
    if origin and _host(origin) != _host(own_origin):
        raise Denied(403, "cross_site", f"requests from {origin} may not change anything here")


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def is_loopback(remote: str) -> bool:
    """Whether a peer address is this host's (127.0.0.0/8, ::1, or v4-mapped loopback)."""
    try:
        return ipaddress.ip_address(remote.removeprefix("::ffff:")).is_loopback
    except ValueError:
        return False
