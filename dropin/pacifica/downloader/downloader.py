"""Upstream's ``pacifica.downloader.downloader``: 0.4.1's call signatures over this project's Downloader.

``Downloader(**kwargs)`` takes 0.4.1's keywords (``cart_api_url``, or ``proto``/``addr``/
``port``; ``auth``; ``session``) and every keyword of :class:`downloader_service.Downloader`.
``cloudevent(location, cloudevent, filename=..., timeout=...)`` and
``transactioninfo(location, transinfo, ...)`` download into ``location/<filename>/`` as
0.4.1 did, and ``_download_from_url(location, cart_url, filename)`` -- the call
pacifica-dispatcher makes -- verifies the files of a cart this downloader's ``cart_api`` set
up. Each returns a :class:`downloader_service.DownloadResult` (or ``ExtractResult``) where
upstream returned ``None``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from downloader_service.archive import ExtractResult
from downloader_service.cartfile import CartFile
from downloader_service.cloudevent import CloudEvent
from downloader_service.downloader import Downloader as _Downloader
from downloader_service.downloader import DownloadResult
from downloader_service.transactioninfo import TransactionInfo

from .cartapi import CartAPI

__all__ = ["Downloader"]


class Downloader(_Downloader):
    """The upstream ``Downloader``: ``Downloader(cart_api_url=..., auth=...)``, methods take ``location``.

    ``Downloader()`` with no argument talks to ``http://127.0.0.1:8081`` (or what
    ``$CARTD_CART_API_URL``, ``$CARTD_PROTO``, ``$CARTD_ADDR``, ``$CARTD_PORT`` say), as
    0.4.1 did. The project's own call style, ``Downloader(location, cart_api_url)`` with
    ``download(files)``, works too.
    """

    cart_api_class = CartAPI

    def cloudevent(self, *args: Any, **kwargs: Any) -> DownloadResult:
        """``cloudevent(location, cloudevent, filename='data', timeout=None)``: an event's files.

        ``timeout`` (seconds) fixes the wait for staging; without it the wait grows with the
        cart (see :meth:`staging_timeout`), never below 0.4.1's 120 s.
        """
        location, event, filename, timeout = _upstream_call("cloudevent", args, kwargs)
        return self.download(CloudEvent.files(event), filename, location, timeout)

    def transactioninfo(self, *args: Any, **kwargs: Any) -> DownloadResult:
        """``transactioninfo(location, transinfo, filename='data', timeout=None)``: a transaction's files."""
        location, transinfo, filename, timeout = _upstream_call("transinfo", args, kwargs)
        return self.download(TransactionInfo.files(transinfo), filename, location, timeout)

    def _download_from_url(self, *args: Any, **kwargs: Any) -> ExtractResult:
        """``_download_from_url(location, cart_url, filename)``: stream a ready cart into ``location``.

        For a cart this downloader's ``cart_api.setup_cart`` created, the tar must hold exactly
        those files with their checksums, and the cart is deleted afterwards (as ``delete_cart``
        says). A cart made elsewhere is extracted unverified -- there is nothing to check it
        against -- but unsafe members (links, devices, ``..``, paths outside ``filename/``)
        are refused all the same. Either way nothing half-written stays behind.
        """
        location, cart_url, filename = _bind(
            "_download_from_url", ("location", "cart_url", "filename"), args, kwargs, {"filename": "data"}
        )
        planned = self.cart_api.planned_files(cart_url) if isinstance(self.cart_api, CartAPI) else None
        files, bundle = planned if planned is not None else (None, False)
        try:
            return super()._fetch_cart(cart_url, filename, files, Path(location), bundle)
        finally:
            if planned is not None:
                self._delete(cart_url)

    def _fetch_cart(
        self, cart_url: str, filename: str, files: Sequence[CartFile] | None, target: Path, bundle: bool
    ) -> ExtractResult:
        # download() set the cart up through cart_api, which remembered it: it is used now.
        if isinstance(self.cart_api, CartAPI):
            self.cart_api.planned_files(cart_url)
        return super()._fetch_cart(cart_url, filename, files, target, bundle)


def _upstream_call(
    document: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str | os.PathLike[str] | None, Mapping[str, Any], str, float | None]:
    """Bind 0.4.1's ``method(location, document, filename=, timeout=)`` (``location`` first)."""
    location, doc, filename, timeout = _bind(
        document,
        ("location", document, "filename", "timeout"),
        args,
        kwargs,
        {"filename": "data", "timeout": None},
    )
    return location, doc, str(filename), None if timeout is None else float(timeout)


def _bind(
    method: str,
    names: tuple[str, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    defaults: dict[str, Any],
) -> list[Any]:
    """The values of ``names`` from positional and keyword arguments, as Python would bind them."""
    if len(args) > len(names):
        raise TypeError(f"{method}() takes at most {len(names)} arguments ({len(args)} given)")
    values = dict(zip(names, args, strict=False))
    for name, value in kwargs.items():
        if name not in names:
            raise TypeError(f"{method}() got an unexpected keyword argument {name!r}")
        if name in values:
            raise TypeError(f"{method}() got multiple values for argument {name!r}")
        values[name] = value
    missing = [name for name in names if name not in values and name not in defaults]
    if missing:
        raise TypeError(f"{method}() missing required argument(s): {', '.join(missing)}")
    return [values.get(name, defaults.get(name)) for name in names]
