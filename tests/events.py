"""Pacifica Notifications events for tests and benchmarks, built the way Notifications sends them."""

from __future__ import annotations

import copy
from typing import Any

from tests.fakecartd import sha1

__all__ = ["file_obj", "make_event"]


def file_obj(file_id: int, name: str, subdir: str, data: bytes) -> dict[str, Any]:
    """A ``destinationTable: Files`` metadata object for ``data``."""
    return {
        "_id": file_id,
        "destinationTable": "Files",
        "name": name,
        "subdir": subdir,
        "hashtype": "sha1",
        "hashsum": sha1(data),
        "size": len(data),
        "mimetype": "application/octet-stream",
    }


def make_event(files: list[dict[str, Any]], version: str = "0.1", event_id: str = "ev-1") -> dict[str, Any]:
    """A Notifications ingest event with ``files`` in ``data``, in 0.1 or 1.0 attribute names."""
    data = [{"destinationTable": "Transactions._id", "value": 1234}, *copy.deepcopy(files)]
    if version == "0.1":
        return {
            "cloudEventsVersion": "0.1",
            "eventID": event_id,
            "eventType": "org.pacifica.metadata.ingest",
            "source": "/pacifica/metadata/ingest",
            "eventTime": "2018-04-05T17:31:00Z",
            "contentType": "application/json",
            "extensions": {},
            "data": data,
        }
    return {
        "specversion": "1.0",
        "id": event_id,
        "type": "org.pacifica.metadata.ingest",
        "source": "/pacifica/metadata/ingest",
        "datacontenttype": "application/json",
        "data": data,
    }
