"""Fleet-wide metrics of every stage but the endpoint (that is pipeline/metrics.py): written by the
process that knows, into the same Redis hash (``pe:metrics``, see pipeline/keys.py), rendered
by :class:`StageCollector` whenever the admin's ``GET /metrics`` is scraped.

Writers add to a :class:`Tally` in memory and flush it in one MULTI: the listener every few
seconds from its dispatcher's loop (so a C-STORE's answer never waits for Redis), the embed and
push workers right after the event. A Redis error never fails the caller: it is logged at debug
and the tally kept for the next flush. Fields follow pipeline/metrics.py: ``name`` or
``name|label=value``; histogram buckets per bucket (not cumulative) as ``<name>|le=<bound>``
plus ``<name>|sum``.

    family                                          type       labels         writer
    pacs_embed_cstore_total                         counter    status         listener
    pacs_embed_received_bytes_total                 counter                   listener
    pacs_embed_associations_total                   counter    outcome        listener (accepted;
                                                                              rejected: intake)
    pacs_embed_spool_write_seconds                  histogram                 listener
    pacs_embed_associations_open                    gauge                     listener reports
    pacs_embed_spool_backlog_instances              gauge                     dispatcher reports
    pacs_embed_spool_free_bytes                     gauge                     admin (the disk)
    pacs_embed_conversions_total                    counter    outcome        dispatcher
    pacs_embed_conversion_seconds                   histogram                 dispatcher
    pacs_embed_queue_jobs                           gauge      queue, state   admin (rq)
    pacs_embed_flags_total                          counter    kind           embed workers
    pacs_embed_pushes_total                         counter    sink, outcome  push service
    pacs_embed_dead_letters                         gauge                     push service
    pacs_embed_study_completion_seconds             histogram                 push service
"""

from __future__ import annotations

import shutil
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import redis
import structlog
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pipeline import health
from pipeline.admin.status import all_queue_depths
from pipeline.deadletters import DeadLetters
from pipeline.intake import IntakeLog, Kind
from pipeline.keys import METRICS, PUSH_COUNTS, text
from pipeline.metrics import bucket_label, histogram_family

log = structlog.get_logger(__name__)

PREFIX = "pacs_embed_"

#: Upper bounds (s) of the conversion buckets: a small CT slice to a large multi-frame object.
CONVERSION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

#: Upper bounds (s) of the durable-write buckets: an fsync on NVMe to one on a busy SAN.
SPOOL_WRITE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

#: Upper bounds (s) of the study completion buckets: ``study.stable_seconds`` (30 s by default)
#: plus embedding and pushing, up to ``study.max_wait_seconds`` and past it.
COMPLETION_BUCKETS = (
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
)  # fmt: skip

#: Conversion outcomes (the dispatcher's), flag kinds (a verdict's), association outcomes.
CONVERTED, SKIPPED, FAILED = "converted", "skipped", "failed"
CONVERSION_OUTCOMES = (CONVERTED, SKIPPED, FAILED)
FLAG_KINDS = ("outlier", "label_mismatch")
ACCEPTED, REJECTED = "accepted", "rejected"

#: Queue registries shown as gauges (rq's finished registry is history, not depth).
QUEUE_STATES = ("queued", "started", "scheduled", "failed")


class Tally:
    """Counts kept in memory (no I/O: safe on the C-STORE path) until :meth:`flush` adds them to
    ``pe:metrics`` in one MULTI. Thread-safe."""

    def __init__(self, connection: redis.Redis) -> None:
        self._redis = connection
        self._lock = threading.Lock()
        self._counts: dict[str, int] = defaultdict(int)
        self._sums: dict[str, float] = defaultdict(float)

    def add(self, field: str, n: int = 1) -> None:
        with self._lock:
            self._counts[field] += n

    def observe(self, name: str, bounds: tuple[float, ...], value: float) -> None:
        """One observation of histogram ``name``."""
        with self._lock:
            self._counts[f"{name}|le={bucket_label(bounds, value)}"] += 1
            self._sums[f"{name}|sum"] += value

    def flush(self) -> None:
        """Write what was added since the last flush; on a Redis error keep it for the next."""
        with self._lock:
            counts, sums = dict(self._counts), dict(self._sums)
            self._counts.clear()
            self._sums.clear()
        if not counts and not sums:
            return
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                for field, n in counts.items():
                    pipe.hincrby(METRICS, field, n)
                for field, value in sums.items():
                    pipe.hincrbyfloat(METRICS, field, value)
                pipe.execute()
        except redis.RedisError as exc:
            log.debug("metrics.write_failed", error=type(exc).__name__)
            with self._lock:
                for field, n in counts.items():
                    self._counts[field] += n
                for field, value in sums.items():
                    self._sums[field] += value


class ListenerMetrics:
    """What the listener counts: C-STOREs by status, data set bytes, associations accepted,
    conversions by outcome and time. In memory; the listener calls :meth:`flush` every few
    seconds (its dispatcher's report) and at stop."""

    def __init__(self, connection: redis.Redis) -> None:
        self.tally = Tally(connection)

    def stored(self, status: int, nbytes: int) -> None:
        """One C-STORE answered ``status``, its data set ``nbytes`` long."""
        self.tally.add(f"cstore|status=0x{status:04X}")
        if nbytes:
            self.tally.add("received_bytes", nbytes)

    def spooled(self, seconds: float) -> None:
        """An instance's durable write (temp file, fsync, link, directory fsync) took this."""
        self.tally.observe("spool_write_seconds", SPOOL_WRITE_BUCKETS, seconds)

    def accepted(self) -> None:
        """An association was accepted (rejections are counted by the intake log)."""
        self.tally.add(f"associations|outcome={ACCEPTED}")

    def converted(self, outcome: str, seconds: float) -> None:
        """A conversion settled with ``outcome`` ``seconds`` after it was submitted."""
        self.tally.add(f"conversions|outcome={outcome}")
        self.tally.observe("conversion_seconds", CONVERSION_BUCKETS, seconds)

    def flush(self) -> None:
        self.tally.flush()


class StageMetrics:
    """What the embed and push workers count, written at once (one MULTI each)."""

    def __init__(self, connection: redis.Redis) -> None:
        self.tally = Tally(connection)

    def flagged(self, kinds: Mapping[str, int]) -> None:
        """Images a verdict flagged, by kind (``outlier``, ``label_mismatch``)."""
        for kind, n in kinds.items():
            if n:
                self.tally.add(f"flags|kind={kind}", n)
        self.tally.flush()

    def study_completed(self, seconds: float) -> None:
        """A study version reached every sink (or completed, with none) ``seconds`` after its
        last arrival."""
        self.tally.observe("study_completion_seconds", COMPLETION_BUCKETS, max(seconds, 0.0))
        self.tally.flush()


def _labelled(fields: Mapping[str, float], name: str, label: str) -> dict[str, float]:
    """``name|label=value`` fields as value -> number."""
    out: dict[str, float] = {}
    for field, number in fields.items():
        head, _, rest = field.partition("|")
        if head == name and rest.startswith(f"{label}="):
            out[rest[len(label) + 1 :]] = number
    return out


def _counter(
    name: str, help_text: str, label: str, values: Mapping[str, float], known: Iterable[str] = ()
) -> CounterMetricFamily:
    """A labelled counter; ``known`` label values are shown at 0 before anything counted."""
    family = CounterMetricFamily(f"{PREFIX}{name}", help_text, labels=[label])
    for value in sorted({*known, *values}):
        family.add_metric([value], values.get(value, 0.0))
    return family


class StageCollector(Collector):
    """Every stage's fleet-wide numbers, from Redis (and the spool's disk) at scrape time."""

    def __init__(self, connection: redis.Redis, spool_dir: Path) -> None:
        self._redis = connection
        self._spool_dir = spool_dir

    def collect(self) -> Iterator[Metric]:
        raw: dict[bytes, bytes] = self._redis.hgetall(METRICS)  # type: ignore[assignment]
        fields = {text(key): float(value) for key, value in raw.items()}
        yield from self._intake(fields)
        yield from self._conversions(fields)
        yield from self._queues()
        yield _counter(
            "flags",
            "Images a verdict flagged, by kind",
            "kind",
            _labelled(fields, "flags", "kind"),
            FLAG_KINDS,
        )
        yield from self._pushes()
        yield histogram_family(
            fields,
            PREFIX,
            "study_completion_seconds",
            COMPLETION_BUCKETS,
            "From a study version's last arrival to its delivery to every sink (to its "
            "completion when no sink is configured)",
        )

    def _intake(self, fields: Mapping[str, float]) -> Iterator[Metric]:
        yield _counter(
            "cstore",
            "C-STORE requests answered, by DIMSE status",
            "status",
            _labelled(fields, "cstore", "status"),
        )
        received = CounterMetricFamily(
            f"{PREFIX}received_bytes", "Data set bytes received in C-STORE requests"
        )
        received.add_metric([], fields.get("received_bytes", 0.0))
        yield received
        rejected = sum(
            n
            for (kind, _), n in IntakeLog(self._redis).totals().items()
            if kind == Kind.ASSOCIATION_REJECTED
        )
        accepted = _labelled(fields, "associations", "outcome").get(ACCEPTED, 0.0)
        yield histogram_family(
            fields,
            PREFIX,
            "spool_write_seconds",
            SPOOL_WRITE_BUCKETS,
            "A received instance's durable write before its 0x0000: temp file, fsync, link, "
            "directory fsync (mostly the disk's flush)",
        )
        yield _counter(
            "associations",
            "Association requests (and connections closed before one), by outcome",
            "outcome",
            {ACCEPTED: accepted, REJECTED: float(rejected)},
        )
        listeners = health.reports(self._redis, health.LISTENER).values()
        yield GaugeMetricFamily(
            f"{PREFIX}associations_open",
            "Associations open now on every live listener",
            value=sum(len(report.get("associations", [])) for report in listeners),
        )
        dispatchers = health.reports(self._redis, health.DISPATCHER).values()
        yield GaugeMetricFamily(
            f"{PREFIX}spool_backlog_instances",
            "Instances accepted but not yet handed to the embed queue, every live listener",
            value=sum(int(report.get("backlog", 0)) for report in dispatchers),
        )
        try:
            free = shutil.disk_usage(self._spool_dir).free
        except OSError:
            return  # no spool dir here (yet): no gauge rather than a wrong one
        yield GaugeMetricFamily(
            f"{PREFIX}spool_free_bytes", "Free bytes on the spool's file system", value=free
        )

    @staticmethod
    def _conversions(fields: Mapping[str, float]) -> Iterator[Metric]:
        yield _counter(
            "conversions",
            "Spooled instances converted, skipped (nothing to embed) or failed, by outcome",
            "outcome",
            _labelled(fields, "conversions", "outcome"),
            CONVERSION_OUTCOMES,
        )
        yield histogram_family(
            fields,
            PREFIX,
            "conversion_seconds",
            CONVERSION_BUCKETS,
            "From an instance's submission to the conversion pool to its result",
        )

    def _queues(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            f"{PREFIX}queue_jobs", "Jobs in each queue, by state", labels=["queue", "state"]
        )
        for queue, depths in all_queue_depths(self._redis).items():
            for state in QUEUE_STATES:
                jobs.add_metric([queue, state], depths[state])
        yield jobs

    def _pushes(self) -> Iterator[Metric]:
        pushes = CounterMetricFamily(
            f"{PREFIX}pushes", "Push jobs by sink and outcome", labels=["sink", "outcome"]
        )
        counts = self._redis.hgetall(PUSH_COUNTS)
        for field, value in sorted((text(k), int(v)) for k, v in counts.items()):
            sink, _, outcome = field.partition("|")
            pushes.add_metric([sink, outcome], value)
        yield pushes
        yield GaugeMetricFamily(
            f"{PREFIX}dead_letters",
            "Pushes dead-lettered and not requeued",
            value=DeadLetters(self._redis).count(),
        )
