"""Fleet-wide endpoint metrics: every worker process writes to Redis, the admin endpoint reads.

Workers run in many processes on many hosts, so a per-process prometheus_client registry would
need every worker scraped. Instead each HTTP attempt adds to fields of one Redis hash
(``pe:metrics``, see pipeline/keys.py; one pipelined round trip), and ``FleetCollector`` turns
the hash into Prometheus families whenever ``GET /metrics`` is scraped. Counters only grow; a
Redis flush resets them, which Prometheus' ``rate()`` handles like a process restart.

Hash fields are ``name`` or ``name|label=value``; histogram buckets are stored per bucket (not
cumulative) as ``<name>|le=<bound>`` plus ``<name>|sum``. Images per second over the last
minute, and the admin page's images per minute over the last hour (:func:`images_per_minute`),
come from 10-second counters that expire on their own after a little over an hour.
``FleetCollector.summary`` is the same numbers as one JSON-able dict, for /status ``endpoint``.

    pacs_embed_endpoint_requests_total{status}      HTTP attempts by status ("timeout", ...)
    pacs_embed_endpoint_retries_total{reason}       retries the client made, by reason
    pacs_embed_endpoint_request_seconds             latency of one attempt (histogram)
    pacs_embed_endpoint_slot_wait_seconds           wait for an in-flight slot (histogram)
    pacs_embed_endpoint_request_bytes_total         request body bytes sent
    pacs_embed_endpoint_images_total                images embedded
    pacs_embed_endpoint_images_per_second           images embedded per second, last minute
    pacs_embed_endpoint_in_flight / _limit          leases held now, and the fleet-wide cap
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import redis
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from pipeline.intake import IntakeLog
from pipeline.keys import METRICS, images_rate_key
from pipeline.ledger import Ledger

log = structlog.get_logger(__name__)

#: The 10-second image counters behind images/s (keys.images_rate_key).
RATE_BUCKET_SECONDS = 10
RATE_WINDOW_BUCKETS = 6  # one minute, not counting the bucket still filling
RATE_KEY_TTL_SECONDS = 3700  # an hour for the admin page's chart, and a bucket's margin

#: Upper bounds (s) of the latency buckets: loopback emulator to Azure's 180 s request timeout.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 180.0)

#: Upper bounds (s) of the slot-wait buckets.
WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0)

#: The name prefix of the endpoint metric families (not a Redis key: those are in keys.py).
METRIC_PREFIX = "pacs_embed_endpoint_"

#: Content-Type of ``render``'s output.
CONTENT_TYPE = CONTENT_TYPE_LATEST

_HISTOGRAMS = {"request_seconds": LATENCY_BUCKETS, "slot_wait_seconds": WAIT_BUCKETS}
_COUNTERS = {
    "requests": ("status", "HTTP attempts to the endpoint, by status or transport error"),
    "retries": ("reason", "Retries made by the endpoint client, by reason"),
    "request_bytes": (None, "Request body bytes sent to the endpoint"),
    "images": (None, "Images embedded by the endpoint"),
}
_HELP = {
    "request_seconds": "Latency of one HTTP attempt to the endpoint",
    "slot_wait_seconds": "Wait for a fleet-wide in-flight slot before an attempt",
}
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]")


class RequestMetrics(Protocol):
    """What the endpoint client reports; ``pipeline.embed`` depends on this protocol only."""

    def attempt(self, *, status: str, seconds: float, bytes_sent: int, images: int) -> None: ...
    def retry(self, reason: str) -> None: ...
    def slot_wait(self, seconds: float) -> None: ...


class _NoMetrics:
    """Counts nothing: for clients built without Redis (tests, one-off commands)."""

    def attempt(self, *, status: str, seconds: float, bytes_sent: int, images: int) -> None:
        pass

    def retry(self, reason: str) -> None:
        pass

    def slot_wait(self, seconds: float) -> None:
        pass


NO_METRICS: RequestMetrics = _NoMetrics()


def _field(name: str, label: str | None = None, value: str | None = None) -> str:
    if label is None:
        return name
    return f"{name}|{label}={_LABEL_VALUE.sub('_', str(value))[:40]}"


def bucket_label(bounds: tuple[float, ...], value: float) -> str:
    """The ``le`` label of the (non-cumulative) bucket ``value`` falls in."""
    for bound in bounds:
        if value <= bound:
            return repr(bound)
    return "+Inf"


def histogram_family(
    fields: Mapping[str, float], prefix: str, name: str, bounds: tuple[float, ...], help_text: str
) -> HistogramMetricFamily:
    """The family ``prefix + name`` from its per-bucket ``<name>|le=<bound>`` fields (made
    cumulative here) and ``<name>|sum``."""
    counts: dict[str, float] = defaultdict(float)
    for field, value in fields.items():
        head, _, rest = field.partition("|")
        if head == name and rest.startswith("le="):
            counts[rest[3:]] += value
    cumulative, buckets = 0.0, []
    for bound in [*(repr(b) for b in bounds), "+Inf"]:
        cumulative += counts.get(bound, 0.0)
        buckets.append((bound, cumulative))
    return HistogramMetricFamily(
        f"{prefix}{name}", help_text, buckets=buckets, sum_value=fields.get(f"{name}|sum", 0.0)
    )


class EndpointMetrics:
    """What the endpoint client reports, written to Redis. Never fails the request it measures:
    a Redis error here is logged and the numbers are lost."""

    def __init__(self, connection: redis.Redis, *, clock: Callable[[], float] = time.time) -> None:
        self._redis = connection
        self._clock = clock

    def attempt(self, *, status: str, seconds: float, bytes_sent: int, images: int) -> None:
        """One HTTP attempt: its outcome, latency, body size and the images it embedded."""
        bucket = bucket_label(LATENCY_BUCKETS, seconds)
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(METRICS, _field("requests", "status", status), 1)
            pipe.hincrby(METRICS, _field("request_seconds", "le", bucket), 1)
            pipe.hincrbyfloat(METRICS, "request_seconds|sum", seconds)
            pipe.hincrby(METRICS, "request_bytes", bytes_sent)
            if images:
                pipe.hincrby(METRICS, "images", images)
                rate_key = images_rate_key(int(self._clock() // RATE_BUCKET_SECONDS))
                pipe.incrby(rate_key, images)
                pipe.expire(rate_key, RATE_KEY_TTL_SECONDS)
            self._execute(pipe)

    def retry(self, reason: str) -> None:
        """The client is about to retry because of ``reason`` (a status or an error kind)."""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(METRICS, _field("retries", "reason", reason), 1)
            self._execute(pipe)

    def slot_wait(self, seconds: float) -> None:
        """How long an attempt waited for a fleet-wide in-flight slot."""
        bucket = bucket_label(WAIT_BUCKETS, seconds)
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(METRICS, _field("slot_wait_seconds", "le", bucket), 1)
            pipe.hincrbyfloat(METRICS, "slot_wait_seconds|sum", seconds)
            self._execute(pipe)

    @staticmethod
    def _execute(pipe: Any) -> None:
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics.write_failed", error=type(exc).__name__)


class FleetCollector(Collector):
    """A prometheus_client collector reading the fleet's numbers from Redis at scrape time."""

    def __init__(
        self,
        connection: redis.Redis,
        *,
        in_flight: Callable[[], int] | None = None,
        in_flight_limit: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = connection
        self._in_flight = in_flight
        self._limit = in_flight_limit
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        raw: dict[bytes, bytes] = self._redis.hgetall(METRICS)  # type: ignore[assignment]
        fields = {key.decode(): float(value) for key, value in raw.items()}
        yield from self._counters(fields)
        yield from self._histograms(fields)
        yield GaugeMetricFamily(
            f"{METRIC_PREFIX}images_per_second",
            "Images embedded per second, fleet-wide, over the last minute",
            value=self._images_per_second(),
        )
        if self._in_flight is not None:
            yield GaugeMetricFamily(
                f"{METRIC_PREFIX}in_flight",
                "Requests in flight now, fleet-wide",
                value=self._in_flight(),
            )
        if self._limit is not None:
            yield GaugeMetricFamily(
                f"{METRIC_PREFIX}in_flight_limit",
                "Fleet-wide cap on requests in flight",
                value=self._limit,
            )

    def summary(self) -> dict[str, Any]:
        """/status ``endpoint``: attempts and errors (any status but 2xx, transport errors
        included) since the counters began, the error rate over them, latency (mean, and the
        bucket bounds under which half and 95 % of attempts finished), retries, requests in
        flight against the fleet-wide limit (None: no limit), images per second (last minute)."""
        raw: dict[bytes, bytes] = self._redis.hgetall(METRICS)  # type: ignore[assignment]
        fields = {key.decode(): float(value) for key, value in raw.items()}
        by_status = {
            rest[len("status=") :]: int(value)
            for field, value in sorted(fields.items())
            for head, _, rest in [field.partition("|")]
            if head == "requests" and rest.startswith("status=")
        }
        requests = sum(by_status.values())
        errors = sum(n for status, n in by_status.items() if not status.startswith("2"))
        retries = sum(
            int(value) for field, value in fields.items() if field.startswith("retries|reason=")
        )
        return {
            "requests": requests,
            "errors": errors,
            "error_rate": round(errors / requests, 4) if requests else 0.0,
            "by_status": by_status,
            "retries": retries,
            "latency_seconds": self._latency(fields),
            "in_flight": self._in_flight() if self._in_flight is not None else None,
            "in_flight_limit": self._limit,
            "images_per_second": round(self._images_per_second(), 3),
        }

    @staticmethod
    def _latency(fields: dict[str, float]) -> dict[str, float | None]:
        counts = [fields.get(f"request_seconds|le={b!r}", 0.0) for b in LATENCY_BUCKETS]
        total = sum(counts) + fields.get("request_seconds|le=+Inf", 0.0)
        if not total:
            return {"mean": None, "p50": None, "p95": None}

        def under(share: float) -> float | None:  # None: past the last bound
            cumulative = 0.0
            for bound, count in zip(LATENCY_BUCKETS, counts, strict=True):
                cumulative += count
                if cumulative >= share * total:
                    return bound
            return None

        mean = fields.get("request_seconds|sum", 0.0) / total
        return {"mean": round(mean, 4), "p50": under(0.5), "p95": under(0.95)}

    def _counters(self, fields: dict[str, float]) -> Iterator[Metric]:
        for name, (label, help_text) in _COUNTERS.items():
            family = CounterMetricFamily(
                f"{METRIC_PREFIX}{name}", help_text, labels=[label] if label else None
            )
            if label is None:
                family.add_metric([], fields.get(name, 0.0))
            else:
                for field, value in sorted(fields.items()):
                    head, _, rest = field.partition("|")
                    if head == name and rest.startswith(f"{label}="):
                        family.add_metric([rest.split("=", 1)[1]], value)
            yield family

    def _histograms(self, fields: dict[str, float]) -> Iterator[Metric]:
        for name, bounds in _HISTOGRAMS.items():
            yield histogram_family(fields, METRIC_PREFIX, name, bounds, _HELP[name])

    def _images_per_second(self) -> float:
        current = int(self._clock() // RATE_BUCKET_SECONDS)
        buckets = [images_rate_key(current - n) for n in range(1, RATE_WINDOW_BUCKETS + 1)]
        values = self._redis.mget(buckets)
        total = sum(int(v) for v in values if v is not None)
        return total / (RATE_WINDOW_BUCKETS * RATE_BUCKET_SECONDS)


def images_per_minute(
    connection: redis.Redis, minutes: int = 60, *, clock: Callable[[], float] = time.time
) -> list[int]:
    """Images embedded fleet-wide in each of the last ``minutes`` clock minutes, oldest first;
    the last is the minute under way."""
    per_minute = 60 // RATE_BUCKET_SECONDS
    first = (int(clock()) // 60 - minutes + 1) * per_minute
    values = connection.mget([images_rate_key(first + n) for n in range(minutes * per_minute)])
    counts = [int(v) if v is not None else 0 for v in values]
    return [sum(counts[m * per_minute : (m + 1) * per_minute]) for m in range(minutes)]


class IntakeCollector(Collector):
    """Instances by current state, and what the listener refused or rejected, from Redis."""

    def __init__(self, connection: redis.Redis) -> None:
        self._redis = connection

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily(
            "pacs_embed_instances", "Received instances by current state", labels=["state"]
        )
        for state, count in Ledger(self._redis).counts().items():
            if state != "received":
                states.add_metric([state], count)
        yield states
        events = CounterMetricFamily(
            "pacs_embed_intake_events",
            "Refused C-STOREs, rejected associations and presentation contexts, non-conformant "
            "UIDs, by kind and reason",
            labels=["kind", "reason"],
        )
        for (kind, reason), count in sorted(IntakeLog(self._redis).totals().items()):
            events.add_metric([kind, reason], count)
        yield events


def render(*collectors: Collector) -> bytes:
    """Prometheus text exposition of ``collectors`` alone (no process metrics of the admin)."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry)
