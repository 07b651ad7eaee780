"""The intake: CloudEvents already read off the wire become job rows, committed before any answer.

No CherryPy here. ``POST /`` (:mod:`.app`) and ``downloader-service jobs import`` (replaying
events Notifications logged while our subscription was disabled) both hand their
:class:`~.webhook.ReceivedEvent` values to :meth:`Intake.accept`, so a replayed event meets
the same checks, the same (``source``, ``id``) de-duplication and the same ``rejected``
handling as one that was posted.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ..cloudevent import CloudEvent
from ..errors import InvalidEventError, InvalidInputError
from . import eventdata
from .errors import ServiceBusyError
from .eventdata import DataList, StoredEvent
from .jobs import Job, JobError, JobState
from .metrics import ServiceMetrics
from .settings import Settings
from .store import FilesColumn, JobStore, NewJob
from .webhook import ReceivedEvent

LOGGER = logging.getLogger(__name__)

# Event ids and sources are keys of the store's unique index: bound them.
MAX_KEY_LENGTH = 1024


class Intake:
    """Turns received events into jobs: validated, de-duplicated, stored in one transaction."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        metrics: ServiceMetrics,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.wake = wake  # tells this process's worker that a job is waiting

    def accept(self, events: Sequence[ReceivedEvent], log_accepted: bool = True) -> list[tuple[Job, bool]]:
        """Make a job of every event and commit them all at once: ``(job, created)`` each.

        An event that can never be downloaded becomes a ``rejected`` job, or, in strict
        mode, refuses the whole request (nothing is stored). Each accepted event is logged
        (``event accepted``), unless ``log_accepted`` is false: the caller logs it in a line of
        its own (``POST /`` in its access line). Rejections and conflicts are always logged.
        """
        new_jobs = [self.new_job(event, index, len(events) > 1) for index, event in enumerate(events)]
        cap = self.settings.max_queued
        if cap and self.store.queued() + sum(1 for job in new_jobs if job.error is None) > cap:
            raise ServiceBusyError(
                f"{cap} jobs are queued already (DOWNLOADER_MAX_QUEUED)",
                retry_after=self.settings.retry_after,
            )
        accepted = self.store.add(new_jobs)
        self.wake()
        for job, created in accepted:
            outcome = (
                "duplicate" if not created else ("rejected" if job.state == JobState.REJECTED else "accepted")
            )
            if job.conflicted:
                # Answered 2xx all the same (Notifications would disable the subscription), but
                # kept on the job, counted and said: new data under an old id is never fetched.
                outcome = "conflict"
                LOGGER.warning(
                    "event id reused with another body; the first body's job stands",
                    extra={"event_id": job.event_id, "source": job.source, "job_id": job.id},
                )
            self.metrics.events.labels(outcome=outcome).inc()
            extra = {"event_id": job.event_id, "job_id": job.id, "state": job.state, "duplicate": not created}
            if created and job.state == JobState.REJECTED and job.error is not None:
                self.metrics.errors.labels(kind=job.error.kind).inc()
                LOGGER.warning(
                    "event rejected", extra={**extra, "error": job.error.kind, "detail": job.error.detail}
                )
            elif log_accepted:
                LOGGER.info("event accepted", extra=extra)
        return accepted

    def new_job(self, event: ReceivedEvent, index: int = 0, batch: bool = False) -> NewJob:
        """The job an event makes: ``queued`` with its files, or ``rejected`` and why."""
        for name, value in (("id", event.id), ("source", event.source)):
            if len(value) > MAX_KEY_LENGTH:
                raise InvalidEventError(
                    f"the event's {name} is longer than {MAX_KEY_LENGTH} characters", field=name
                )
        job_id = uuid.uuid4().hex
        stored = StoredEvent.of(event.record())
        document = event.document()
        if isinstance(event.data, DataList):
            # The stored text has it all: the chunks go (10 MB for the largest event) before
            # the files are checked, and the check reads the data from the stored text.
            event.data.release()
            document["data"] = eventdata.stored_data(stored.text, len(event.data))
        try:
            if event.type not in self.settings.event_types:
                raise InvalidEventError(
                    f"event {event.id!r} has type {event.type!r}; this service takes "
                    + ", ".join(self.settings.event_types),
                    field="type",
                )
            # Each file encoded for the store as it is checked: no list of them all.
            files = FilesColumn()
            CloudEvent.check_files(document, files.add)
        except InvalidInputError as exc:
            if self.settings.strict:
                if batch:
                    context: dict[str, Any] = dict(exc.context)
                    raise type(exc)(f"batch[{index}]: {exc}", index=index, **context) from exc
                raise
            return NewJob(job_id, event.source, event.id, event.type, stored, (), JobError.of(exc))
        return NewJob(job_id, event.source, event.id, event.type, stored, files)
