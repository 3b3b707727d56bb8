"""Prometheus metrics: request counts and latencies per route (this process), credits granted,
spent and expired (the whole ledger, read from the journal, so every worker process answers the
same), and the cycles of the worker's jobs run in this process (none where TALLY_WORKER=off)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger("tally.metrics")

#: How long a read of the journal's totals is reused: bounds the cost of frequent scrapes.
CREDITS_CACHE_SECONDS: Final = 15.0
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: Journal entry types summed into each credits metric.
CREDIT_FLOWS: Final = {
    "granted": ("grant",),
    "spent": ("capture", "debit"),
    "expired": ("expire",),
}


class _Credits(Collector):
    """The journal's totals. A failed read never fails the scrape (the request metrics
    matter most when the database does not answer): it serves the last totals read, or
    none yet, counts the failure, and tries again after the cache period."""

    def __init__(self, totals: Callable[[], dict[str, int]]) -> None:
        self._totals = totals
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._last: dict[str, int] | None = None
        self._failures = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self._lock:
            now = time.monotonic()
            if self._read_at is None or now - self._read_at > CREDITS_CACHE_SECONDS:
                self._read_at = now
                try:
                    self._last = self._totals()
                except Exception:  # any failure: the scrape goes on
                    self._failures += 1
                    log.warning("credit_totals_unreadable", exc_info=True)
            totals, failures = self._last, self._failures
        family = CounterMetricFamily(
            "tally_credits_read_failures",
            "Reads of the journal's totals that failed (the credits metrics keep the last read)",
            labels=(),
        )
        family.add_metric((), failures)
        yield family
        if totals is None:
            return
        for flow, types in CREDIT_FLOWS.items():
            family = CounterMetricFamily(
                f"tally_credits_{flow}", f"Credits {flow}, from the journal", labels=()
            )
            family.add_metric((), sum(totals.get(t, 0) for t in types))
            yield family


class Metrics:
    def __init__(self, credit_totals: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tally_http_requests",
            "HTTP requests answered",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "tally_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ("method", "route"),
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "tally_rate_limited",
            "Requests refused by a rate limit, by the limit that tripped",
            ("limit",),
            registry=self.registry,
        )
        self.registry.register(_Credits(credit_totals))
        self.worker_cycles = Counter(
            "tally_worker_cycles",
            "Runs of the worker's jobs in this process, by job and outcome (ok, failed)",
            ("job", "outcome"),
            registry=self.registry,
        )
        self.worker_starts = Counter(
            "tally_worker_starts",
            "Runs of the worker's jobs begun in this process, by job",
            ("job",),
            registry=self.registry,
        )
        self.worker_last_success = Gauge(
            "tally_worker_last_success_timestamp_seconds",
            "When each of the worker's jobs last completed without an error (Unix time)",
            ("job",),
            registry=self.registry,
        )
        self.mail = Counter(
            "tally_mail_messages",
            "Outbox messages the worker handled, by outcome (sent, retried, failed)",
            ("outcome",),
            registry=self.registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def worker_started(self, job: str) -> None:
        self.worker_starts.labels(job).inc()

    def worker_cycle(self, job: str, *, ok: bool) -> None:
        self.worker_cycles.labels(job, "ok" if ok else "failed").inc()
        if ok:
            self.worker_last_success.labels(job).set_to_current_time()

    def mail_handled(self, *, sent: int, retried: int, failed: int) -> None:
        for outcome, count in (("sent", sent), ("retried", retried), ("failed", failed)):
            if count:
                self.mail.labels(outcome).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
