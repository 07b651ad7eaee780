from __future__ import annotations

import pytest

from downloader_service import InvalidTransactionInfoError, NoFilesError, TransactionInfo
from tests.fakecartd import sha1


def transinfo(**files: dict[str, str]) -> dict[str, object]:
    return {"transaction": 67, "files": files}


def test_yield_files_uses_keys_as_ids_and_joins_paths() -> None:
    doc = transinfo(
        **{
            "34": {"name": "foo.txt", "subdir": "a/b", "hashtype": "sha1", "hashsum": sha1(b"foo")},
            "35": {"name": "bar.txt", "subdir": "", "hashtype": "md5", "hashsum": "0" * 32},
        }
    )
    assert list(TransactionInfo.yield_files(doc)()) == [
        {"id": "34", "path": "a/b/foo.txt", "hashtype": "sha1", "hashsum": sha1(b"foo")},
        {"id": "35", "path": "bar.txt", "hashtype": "md5", "hashsum": "0" * 32},
    ]


def test_yield_files_names_the_bad_file_by_id() -> None:
    doc = transinfo(**{"34": {"name": "x", "subdir": "/abs", "hashtype": "sha1", "hashsum": sha1(b"")}})
    with pytest.raises(InvalidTransactionInfoError) as info:
        TransactionInfo.yield_files(doc)
    assert info.value.object == "files['34']"
    assert "absolute" in str(info.value)


@pytest.mark.parametrize("doc", [{}, {"files": []}, [], {"files": "x"}])
def test_yield_files_refuses_documents_without_a_files_object(doc: object) -> None:
    with pytest.raises(InvalidTransactionInfoError, match="'files' maps file ids"):
        TransactionInfo.yield_files(doc)  # type: ignore[arg-type]


def test_yield_files_with_no_files_is_no_files_error() -> None:
    with pytest.raises(NoFilesError):
        TransactionInfo.yield_files(transinfo())


def test_yield_files_refuses_a_file_that_is_not_an_object() -> None:
    with pytest.raises(InvalidTransactionInfoError, match="name is missing"):
        TransactionInfo.yield_files(transinfo(**{"3": "oops"}))  # type: ignore[arg-type]


def test_yield_files_refuses_a_file_that_another_file_needs_as_a_directory() -> None:
    doc = transinfo(
        **{
            "34": {"name": "b.txt", "subdir": "a/x", "hashtype": "sha1", "hashsum": sha1(b"")},
            "35": {"name": "x", "subdir": "a", "hashtype": "sha1", "hashsum": sha1(b"")},
        }
    )
    with pytest.raises(InvalidTransactionInfoError, match=r"'a/x/b\.txt' needs 'a/x' as a directory") as info:
        TransactionInfo.yield_files(doc)
    assert info.value.object == "files['34']"


def test_yield_files_shortens_a_huge_file_id_in_messages() -> None:
    doc = transinfo(**{"7" * 100_000: {"name": "f\udc80", "hashtype": "sha1", "hashsum": sha1(b"")}})
    with pytest.raises(InvalidTransactionInfoError, match="not valid Unicode") as info:
        TransactionInfo.yield_files(doc)
    assert len(str(info.value)) < 1000
