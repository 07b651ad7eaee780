"""Files from a Pacifica Policy transaction-info document (``files`` keyed by file id)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import requests

from .cartapi import connection_problem, html_title
from .cartfile import CartFile, YieldFiles, as_yield_files, collect_files
from .errors import InvalidTransactionInfoError, PolicyUnavailableError, echo


class TransactionInfo:
    """Turn ``GET /status/transactions/by_id/<id>`` output into the files of a cart."""

    @staticmethod
    def files(transinfo: Mapping[str, Any]) -> list[CartFile]:
        """Validate the document and return its files, or raise an invalid-input error."""
        files = transinfo.get("files") if isinstance(transinfo, Mapping) else None
        if not isinstance(files, Mapping):
            raise InvalidTransactionInfoError(
                "transaction info must be an object whose 'files' maps file ids to files",
                field="files",
            )
        return collect_files(_entries(files), InvalidTransactionInfoError, "transaction info", _label)

    @staticmethod
    def yield_files(transinfo: Mapping[str, Any]) -> YieldFiles:
        """Return a callable yielding the Cartd file objects of the transaction (upstream API)."""
        return as_yield_files(TransactionInfo.files(transinfo))


def _entries(files: Mapping[str, Any]) -> Iterator[tuple[str, Any, Any, Any, Mapping[str, Any]]]:
    for file_id, obj in files.items():
        if not isinstance(obj, Mapping):
            obj = {}
        yield file_id, file_id, obj.get("name"), obj.get("subdir"), obj


def _label(file_id: str, _shown_id: str | None) -> str:
    return f"files[{echo(file_id)}]"


def fetch_transaction_info(
    policy_url: str,
    transaction_id: str,
    session: requests.Session | None = None,
    timeout: tuple[float, float] = (5.0, 60.0),
    **request_kwargs: Any,
) -> dict[str, Any]:
    """``GET {policy_url}/status/transactions/by_id/{id}``: the document ``yield_files`` reads."""
    by_id = f"{policy_url.rstrip('/')}/status/transactions/by_id"
    return fetch_transaction_document(by_id, transaction_id, session, timeout, **request_kwargs)


def fetch_transaction_document(
    by_id_url: str,
    transaction_id: str,
    session: requests.Session | None = None,
    timeout: tuple[float, float] = (5.0, 60.0),
    **request_kwargs: Any,
) -> dict[str, Any]:
    """``GET {by_id_url}/{id}`` (pacifica-cli's ``download_policy_url`` is such a ``by_id_url``).

    ``request_kwargs`` go to the request as they are (``verify``, ``cert``, ``auth``). Every
    failure is an :class:`InvalidTransactionInfoError` (no such transaction, not a document)
    or a :class:`PolicyUnavailableError` (Policy unreachable or refusing).
    """
    if not str(transaction_id).isdigit():
        raise InvalidTransactionInfoError(
            f"a transaction id is a number, not {echo(transaction_id)}", field="transaction_id"
        )
    url = f"{by_id_url.rstrip('/')}/{transaction_id}"
    try:
        with (session or requests.Session()).get(url, timeout=timeout, **request_kwargs) as resp:
            if resp.status_code == 404:
                raise InvalidTransactionInfoError(
                    f"Policy knows no transaction {transaction_id} ({url})", field="transaction_id", url=url
                )
            if resp.status_code != 200:
                raise PolicyUnavailableError(
                    f"Policy answered {resp.status_code} {resp.reason} for {url}{_page_title(resp)}",
                    url=url,
                    status=resp.status_code,
                )
            doc = resp.json()
    except requests.JSONDecodeError as exc:
        raise PolicyUnavailableError(f"Policy's answer for {url} is not JSON: {exc}", url=url) from exc
    except requests.RequestException as exc:
        raise PolicyUnavailableError(
            f"cannot reach Policy at {url}: {connection_problem(exc)}", url=url
        ) from exc
    except OSError as exc:  # requests' words for a CA bundle or certificate file it cannot find
        raise PolicyUnavailableError(
            f"cannot reach Policy at {url}: {exc}", url=url, retryable=False
        ) from exc
    if not isinstance(doc, dict):
        raise InvalidTransactionInfoError(
            f"Policy's answer for {url} is not an object", field="files", url=url
        )
    return doc


def _page_title(resp: requests.Response) -> str:
    """``: <title>`` of an HTML error page (a TLS terminator's "No required SSL certificate was sent")."""
    if "html" not in resp.headers.get("Content-Type", ""):
        return ""
    title = html_title(resp.text[:8192])
    return f": {title}" if title else ""
