from __future__ import annotations

import inspect
from pathlib import Path

import downloader_service
from downloader_service import errors


def test_all_is_sorted_and_importable() -> None:
    names = [name for name in downloader_service.__all__ if name != "__version__"]
    assert names == sorted(names)
    for name in downloader_service.__all__:
        assert hasattr(downloader_service, name), name


def test_upstream_names_are_exported() -> None:
    for name in ("Downloader", "CartAPI", "CloudEvent", "TransactionInfo"):
        assert name in downloader_service.__all__


def test_every_error_is_exported_and_drawn_in_the_tree() -> None:
    classes = [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, errors.DownloaderError)
    ]
    assert len(classes) >= 15
    doc = errors.__doc__ or ""
    for cls in classes:
        assert cls.__name__ in downloader_service.__all__, cls
        assert cls.__name__ in doc, cls


def test_retryable_follows_the_tree() -> None:
    assert not errors.InvalidEventError("x").retryable
    assert errors.CartTimeoutError("x").retryable
    assert errors.CartUnavailableError("x").retryable
    assert not errors.UnsafeArchiveError("x").retryable
    assert not errors.HashMismatchError("x").retryable
    assert isinstance(errors.InvalidEventError("x"), ValueError)


def test_errors_carry_context_as_attributes() -> None:
    error = errors.UnsafeArchiveError("refused", member="data/../x")
    assert error.member == "data/../x"
    assert error.context == {"member": "data/../x"}
    assert str(error) == "refused"


def test_package_is_typed() -> None:
    assert (Path(downloader_service.__file__).parent / "py.typed").exists()


def test_service_only_errors_are_not_the_librarys_public_api() -> None:
    for name in ("PayloadTooLargeError", "ServiceBusyError", "UnsupportedMediaTypeError"):
        assert name not in downloader_service.__all__
        assert not hasattr(downloader_service, name)
