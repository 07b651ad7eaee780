"""Upstream's ``pacifica.downloader.cartapi``: 0.4.1's constructor over this project's Cartd client.

What differs from upstream is what a caller sees when something goes wrong: errors from
:mod:`downloader_service.errors` (``CartFailedError`` where upstream failed an ``assert`` on
the POST's status, ``CartTimeoutError`` where it asserted after the last poll) instead of
``AssertionError`` or a ``KeyError`` on a missing header, and a timeout on every request.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from downloader_service.cartapi import DEFAULT_CART_TIMEOUT
from downloader_service.cartapi import CartAPI as _CartAPI
from downloader_service.cartfile import CartdFile, CartFile, as_yield_files, validated_files
from downloader_service.errors import DownloaderError

__all__ = ["CartAPI"]

# 0.4.1's URL parts and their defaults; each may come from CARTD_<PART> in the environment.
_URL_PARTS = (("proto", "http"), ("addr", "127.0.0.1"), ("port", "8081"))
# Cartd's POST body takes ``fileids`` and, from 0.7, ``bundle``: nothing else can be sent.
_EXTRA_ARGS = frozenset({"bundle"})
# How many carts set up but not yet downloaded keep their file list (for the checks).
_REMEMBERED_CARTS = 32

Files = Callable[[], Iterator[CartdFile]] | Iterable[CartdFile]


class CartAPI(_CartAPI):
    """The upstream ``CartAPI``: ``CartAPI(cart_api_url=..., auth=..., session=...)``.

    As in 0.4.1 the URL is ``cart_api_url``, else ``$CARTD_CART_API_URL``, else
    ``{proto}://{addr}:{port}`` from the keywords or ``$CARTD_PROTO``, ``$CARTD_ADDR`` and
    ``$CARTD_PORT`` (``http``, ``127.0.0.1``, ``8081``). ``auth`` is upstream's dict of
    request keyword arguments (``cert``, ``verify``, ``auth``, ...). ``extra_args`` may carry
    ``bundle`` (the only other key Cartd's POST takes). Every keyword of
    :class:`downloader_service.CartAPI` (timeouts, polling) is accepted as well.

    The files of each cart :meth:`setup_cart` creates are kept (for the last 32 carts) so that
    ``Downloader._download_from_url`` can verify exactly those files and their checksums.
    """

    def __init__(self, cart_api_url: str | None = None, **kwargs: Any) -> None:
        url = cart_api_url or upstream_cart_api_url(kwargs, os.environ)
        extra_args = dict(kwargs.pop("extra_args", None) or {})
        unknown = set(extra_args) - _EXTRA_ARGS
        if unknown:
            raise TypeError(f"extra_args may carry only {sorted(_EXTRA_ARGS)}, not {sorted(unknown)}")
        self.bundle = bool(extra_args.get("bundle", False))
        super().__init__(url, **kwargs)
        self._carts: OrderedDict[str, tuple[Sequence[CartFile], bool]] = OrderedDict()
        self._carts_lock = threading.Lock()

    def setup_cart(self, yield_files: Any, bundle: bool | None = None, cart_url: str | None = None) -> str:
        """Create a cart and return its URL; ``yield_files`` is a generator function or an iterable.

        Every file is checked before anything is sent (an id, a safe relative path, a known
        ``hashtype`` and a ``hashsum`` of its length): one bad file refuses the whole cart
        with an ``InvalidInputError`` naming it.
        """
        source = yield_files if callable(yield_files) else _called(yield_files)
        files = validated_files(source)
        bundle = self.bundle if bundle is None else bundle
        url = super().setup_cart(as_yield_files(files), bundle=bundle, cart_url=cart_url)
        with self._carts_lock:
            self._carts[url] = (files, bundle)
            while len(self._carts) > _REMEMBERED_CARTS:
                self._carts.popitem(last=False)
        return url

    def wait_for_cart(
        self,
        cart_url: str,
        timeout: float = DEFAULT_CART_TIMEOUT,
        on_status: Callable[[str, str], None] | None = None,
    ) -> str:
        """Poll until the cart is ready (see the base class); a cart that failed is forgotten."""
        try:
            return super().wait_for_cart(cart_url, timeout, on_status)
        except DownloaderError:
            self.planned_files(cart_url)
            raise

    def planned_files(self, cart_url: str) -> tuple[Sequence[CartFile], bool] | None:
        """The files and bundle flag of a cart this client set up (and forget it), or None."""
        with self._carts_lock:
            return self._carts.pop(cart_url, None)


def upstream_cart_api_url(kwargs: dict[str, Any], environ: Mapping[str, str]) -> str:
    """0.4.1's Cartd URL from the keywords (popped) and the environment.

    Falsy keywords count as absent, as upstream's ``_server_url`` has it.
    """
    url = kwargs.pop("cart_api_url", None) or environ.get("CARTD_CART_API_URL")
    parts = {
        name: kwargs.pop(name, None) or environ.get(f"CARTD_{name.upper()}") or default
        for name, default in _URL_PARTS
    }
    return str(url or "{proto}://{addr}:{port}".format(**parts))


def _called(files: Iterable[CartdFile]) -> Callable[[], Iterator[CartdFile]]:
    """An iterable (a list, a generator) as the callable ``setup_cart`` reads files from."""
    if isinstance(files, (str, bytes, Mapping)) or not isinstance(files, Iterable):
        raise TypeError(
            "setup_cart takes a generator function or an iterable of Cartd file objects, "
            f"not {type(files).__name__}"
        )
    return lambda: iter(files)
