"""Hooks a caller implements to watch a download (the command line draws its bars with them)."""

from __future__ import annotations


class DownloadProgress:
    """Receives progress events; every method is a no-op here, override what you need.

    Methods must be quick. The ``cart_*`` ones are called from the downloading thread; the
    ``file_*`` ones from it or, for large files, from the extraction's writer thread, which
    hashes and writes while the downloading thread reads on. Either way they come one at a
    time and in order: a file is started, advanced and finished before the next starts.
    """

    def cart_planned(self, cart_url: str) -> None:
        """The cart is about to be asked for at ``cart_url`` (record it if you may die)."""

    def cart_created(self, cart_url: str, files: int) -> None:
        """The cart was accepted by Cartd."""

    def cart_status(self, status: str, message: str) -> None:
        """A status poll answered (``staging``, ``ready``, ...)."""

    def file_started(self, path: str, size: int) -> None:
        """A file began to stream; ``size`` is what the tar header declares."""

    def file_advanced(self, nbytes: int) -> None:
        """``nbytes`` more bytes of the current file were written and hashed."""

    def file_finished(self, path: str) -> None:
        """The current file was written and its checksum matched."""
