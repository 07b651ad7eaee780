"""The service's Prometheus metrics, kept in a registry of its own (no global state).

Counters are this process's own; the job gauges (by state, queue age) are read from the
job store at scrape time, so every replica reports the same shared queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

LOGGER = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Carts take from tens of milliseconds (a few small files) to many minutes (terabytes).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class _StoreCollector(Collector):
    """Jobs by state and the age of the oldest due job, asked of the store when scraped."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = self.stats()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the database is away
            LOGGER.warning("metrics could not read the job store", extra={"detail": str(exc)})
            return
        by_state = GaugeMetricFamily("downloader_jobs", "Jobs in the store, by state", labels=["state"])
        for state, count in stats["jobs"].items():
            by_state.add_metric([state], count)
        yield by_state
        yield GaugeMetricFamily(
            "downloader_queue_depth", "Jobs waiting for a worker (queued)", value=stats["jobs"]["queued"]
        )
        yield GaugeMetricFamily(
            "downloader_oldest_due_job_seconds",
            "How long the oldest due job has waited for a worker",
            value=stats["oldest_due_seconds"],
        )


class _SubscriptionCollector(Collector):
    """Whether the Notifications subscription is enabled, and its open gaps, at scrape time."""

    def __init__(self, report: Callable[[], dict[str, Any]]) -> None:
        self.report = report

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            report = self.report()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the database is away
            LOGGER.warning("metrics could not read the subscription", extra={"detail": str(exc)})
            return
        yield GaugeMetricFamily(
            "downloader_subscription_enabled",
            "1 when the last check found the Notifications subscription enabled, else 0",
            value=1 if report["state"] == "enabled" else 0,
        )
        yield GaugeMetricFamily(
            "downloader_subscription_gaps",
            "Windows in which Notifications routed nothing here, not yet replayed or dismissed",
            value=len(report.get("gaps", ())),
        )


class ServiceMetrics:
    """Events by outcome, job results, errors by kind, bytes, files and durations."""

    def __init__(self, identity: dict[str, str] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "downloader_events",
            "CloudEvents received, by outcome (accepted, rejected, duplicate, conflict, busy, invalid)",
            ["outcome"],
            registry=self.registry,
        )
        self.jobs_finished = Counter(
            "downloader_jobs_finished",
            "Jobs this process ended, by state (done, failed)",
            ["state"],
            registry=self.registry,
        )
        self.retries = Counter(
            "downloader_retries",
            "Failed attempts scheduled for a retry, by error kind",
            ["kind"],
            registry=self.registry,
        )
        self.failures = Counter(
            "downloader_failures", "Failed download attempts, by error kind", ["kind"], registry=self.registry
        )
        self.errors = Counter("downloader_errors", "Error answers, by kind", ["kind"], registry=self.registry)
        self.bytes = Counter("downloader_bytes", "Bytes downloaded and verified", registry=self.registry)
        self.files = Counter("downloader_files", "Files downloaded and verified", registry=self.registry)
        self.duration = Histogram(
            "downloader_download_seconds",
            "Time of the successful attempt, from claim to files in place",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "downloader_event_seconds",
            "Time from event accepted to files in place (retries included)",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.bytes_per_second = Gauge(
            "downloader_last_bytes_per_second",
            "Throughput of the last finished download",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "downloader_jobs_in_flight", "Downloads this process runs now", registry=self.registry
        )
        if identity:
            Info("downloader_worker", "Who this process is", registry=self.registry).info(identity)

    def watch_store(self, stats: Callable[[], dict[str, Any]]) -> None:
        """Report the store's job counts at every scrape."""
        self.registry.register(_StoreCollector(stats))

    def watch_subscription(self, report: Callable[[], dict[str, Any]]) -> None:
        """Report the subscription's state and open gaps at every scrape."""
        self.registry.register(_SubscriptionCollector(report))

    def job_done(self, files: int, nbytes: int, seconds: float, since_accepted: float) -> None:
        """A job ended ``done``."""
        self.jobs_finished.labels(state="done").inc()
        self.bytes.inc(nbytes)
        self.files.inc(files)
        self.duration.observe(seconds)
        self.latency.observe(max(0.0, since_accepted))
        if seconds > 0:
            self.bytes_per_second.set(nbytes / seconds)

    def job_failed(self, kind: str) -> None:
        """A job ended ``failed`` (a dead letter)."""
        self.failures.labels(kind=kind).inc()
        self.jobs_finished.labels(state="failed").inc()

    def job_retried(self, kind: str) -> None:
        """An attempt failed and the job will be retried."""
        self.failures.labels(kind=kind).inc()
        self.retries.labels(kind=kind).inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
