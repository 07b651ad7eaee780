"""The service's Prometheus metrics, kept in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Carts take from tens of milliseconds (a few small files) to many minutes (terabytes).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class ServiceMetrics:
    """Counters for events by outcome, bytes and files written, download durations."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "downloader_events",
            "CloudEvents received, by outcome (done, failed, rejected, duplicate, busy)",
            ["outcome"],
            registry=self.registry,
        )
        self.errors = Counter(
            "downloader_errors", "Errors answered, by kind", ["kind"], registry=self.registry
        )
        self.bytes = Counter("downloader_bytes", "Bytes downloaded and verified", registry=self.registry)
        self.files = Counter("downloader_files", "Files downloaded and verified", registry=self.registry)
        self.duration = Histogram(
            "downloader_download_seconds",
            "Time from event accepted to files in place",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "downloader_jobs_in_flight", "Downloads queued or running", registry=self.registry
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
