"""Files from a Pacifica Notifications CloudEvent (0.1 as Notifications sends it, or 1.0)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .cartfile import CartFile, YieldFiles, as_yield_files, collect_files
from .errors import InvalidEventError, echo


class CloudEvent:
    """Turn an event's ``data`` list into the files of a cart."""

    @staticmethod
    def files(cloudevent: Mapping[str, Any]) -> list[CartFile]:
        """Validate the event and return its files, or raise :class:`InvalidEventError`.

        ``data`` is a flat list of metadata objects; those with ``destinationTable: "Files"``
        are files. Every problem is reported at once, each naming the object's index.
        """
        if not isinstance(cloudevent, Mapping):
            raise InvalidEventError(
                f"a CloudEvent is a JSON object, not {type(cloudevent).__name__}", field="event"
            )
        data = cloudevent.get("data")
        if not isinstance(data, list):
            got = "missing" if data is None else f"a {type(data).__name__}"
            raise InvalidEventError(
                f"event {echo(event_id(cloudevent))}: data must be a list of metadata objects, got {got}",
                field="data",
            )
        return collect_files(_entries(data), InvalidEventError, f"event {echo(event_id(cloudevent))}")

    @staticmethod
    def yield_files(cloudevent: Mapping[str, Any]) -> YieldFiles:
        """Return a callable yielding the Cartd file objects of the event (upstream API).

        The event is validated now, so a bad event fails here and not halfway through a POST.
        """
        return as_yield_files(CloudEvent.files(cloudevent))


def event_id(cloudevent: Mapping[str, Any]) -> str:
    """The event's id under its 1.0 (``id``) or 0.1 (``eventID``) name, for messages."""
    return str(cloudevent.get("id", cloudevent.get("eventID", "<no id>")))


def _entries(data: list[Any]) -> Iterator[tuple[str, Any, Any, Any, Mapping[str, Any]]]:
    for index, obj in enumerate(data):
        if not isinstance(obj, Mapping) or obj.get("destinationTable") != "Files":
            continue
        label = f"data[{index}]" + (f" (_id {echo(obj['_id'])})" if "_id" in obj else "")
        yield label, obj.get("_id"), obj.get("name"), obj.get("subdir"), obj
