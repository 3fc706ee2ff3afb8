"""The /status document, gathered from Redis and the state dir. Counts and UIDs, no PHI (a
calling AE title and a peer address are the sender's, not the patient's).

``uptime_seconds`` is how long the longest-running live component (listener, embed or push
worker) has been up: `pacs-embed run` restarts a child that dies, so this is the daemon's uptime
unless every component restarted since; None while none reports (so never the admin's own).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import redis
from rq import Queue

from pipeline import health, keys
from pipeline.deadletters import DeadLetters
from pipeline.intake import IntakeLog
from pipeline.jobs import EMBED_QUEUE, PUSH_QUEUE, PUSH_QUEUE_PREFIX
from pipeline.keys import text
from pipeline.ledger import Ledger
from pipeline.metrics import FleetCollector, images_per_minute
from pipeline.studies import Studies

#: Components whose reports carry ``since`` (when the process started): what uptime is of.
_UP = (health.LISTENER, health.WORKER, health.PUSHER)


def queue_depths(connection: redis.Redis, name: str = EMBED_QUEUE) -> dict[str, int]:
    queue = Queue(name, connection=connection)
    return {
        "queued": queue.count,
        "started": queue.started_job_registry.count,
        "scheduled": queue.scheduled_job_registry.count,
        "failed": queue.failed_job_registry.count,
        "finished": queue.finished_job_registry.count,
    }


def all_queue_depths(connection: redis.Redis) -> dict[str, dict[str, int]]:
    """``embed``, and ``push``: every listener node's push queue (``push-<node>``) summed."""
    names = [queue.name for queue in Queue.all(connection=connection)]
    push = [name for name in names if name.startswith(PUSH_QUEUE_PREFIX)]
    summed = dict.fromkeys(queue_depths(connection, PUSH_QUEUE), 0)
    for name in push:
        for state, count in queue_depths(connection, name).items():
            summed[state] += count
    return {EMBED_QUEUE: queue_depths(connection, EMBED_QUEUE), "push": summed}


def studies(connection: redis.Redis, limit: int = 20) -> dict[str, Any]:
    """The most recent studies (by last arrival) with their progress and pushes."""
    versions = Studies(connection)
    found = [versions.progress(uid) for uid in versions.recent(limit)]
    return {"recent": [p.to_json() for p in found if p is not None]}


def sinks(connection: redis.Redis, push_depths: dict[str, int]) -> dict[str, Any]:
    """Pushes by sink and outcome, pushes waiting (queued, scheduled for a retry, running: from
    ``push_depths``, ``all_queue_depths``'s ``push``) and the dead letters, newest first."""
    counts: dict[str, dict[str, int]] = {}
    for field, value in connection.hgetall(keys.PUSH_COUNTS).items():
        sink, _, outcome = text(field).partition("|")
        counts.setdefault(sink, {})[outcome] = int(value)
    letters = DeadLetters(connection)
    return {
        "pushes": counts,
        "pending": sum(push_depths[k] for k in PENDING),
        "dead_lettered": letters.count(),
        "dead_letters": [letter.to_json() for letter in letters.recent(limit=20)],
    }


#: Push queue registries whose jobs are still to be delivered.
PENDING = ("queued", "started", "scheduled")


def software_version() -> str:
    """pacs-embed's version, as installed."""
    try:
        return version("pacs-embed")
    except PackageNotFoundError:
        return "unknown"


def associations(listeners: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Open associations on every listener, oldest first: calling AE, address, since (unix
    seconds), instances stored so far, and the listener (host:pid) holding it."""
    found = [
        {**assoc, "listener": name}
        for name, report in listeners.items()
        for assoc in report.get("associations", [])
    ]
    return sorted(found, key=lambda a: a.get("since", 0.0))


def uptime(reports: list[dict[str, Any]], now: float) -> float | None:
    starts = [float(r["since"]) for r in reports if isinstance(r.get("since"), int | float)]
    return round(now - min(starts), 1) if starts else None


def gather(
    connection: redis.Redis,
    ledger: Ledger,
    intake: IntakeLog,
    spool_dir: Path,
    quarantine_dir: Path,
    *,
    fleet: FleetCollector | None = None,
) -> dict[str, Any]:
    """``instances``: current states, adding up to ``received``; ``counters``: cumulative event
    counts; ``input``: what the listener refused or rejected; ``failures`` and ``skipped``: the
    most recent first; ``endpoint``: ``fleet``'s summary (``FleetCollector.summary``; without
    a collector, the counters without the in-flight leases); ``throughput``: images embedded
    per minute over the last hour, oldest first."""
    reports = {component: health.reports(connection, component) for component in _UP}
    up = [report for by_name in reports.values() for report in by_name.values()]
    queues = all_queue_depths(connection)
    return {
        "version": software_version(),
        "uptime_seconds": uptime(up, time.time()),
        "associations": associations(reports[health.LISTENER]),
        "endpoint": (fleet or FleetCollector(connection)).summary(),
        "throughput": {"minute_seconds": 60, "images": images_per_minute(connection)},
        "instances": ledger.counts(),
        "counters": ledger.counters(),
        "input": intake.summary(),
        "queues": queues,
        # live workers from their own reports (renewed every second, unlike rq's registration:
        # a killed worker is gone from here within seconds)
        "workers": [
            {"name": name, **report, "jobs": health.jobs(report)}
            for name, report in sorted(reports[health.WORKER].items())
        ],
        "dispatchers": health.reports(connection, health.DISPATCHER),
        "pushers": {
            name: {**report, "jobs": health.jobs(report)}
            for name, report in reports[health.PUSHER].items()
        },
        "studies": studies(connection),
        "sinks": sinks(connection, queues["push"]),
        "failures": [asdict(failure) for failure in ledger.failures(limit=50)],
        "skipped": {"recent": [asdict(skip) for skip in ledger.skips(limit=20)]},
        "spool": {
            "free_bytes": shutil.disk_usage(spool_dir).free if spool_dir.exists() else None,
            "quarantined": sum(1 for _ in quarantine_dir.glob("*.dcm"))
            if quarantine_dir.exists()
            else 0,
        },
    }


def ready(
    connection: redis.Redis,
    spool_dir: Path,
    *,
    min_free_bytes: int = 0,
    endpoint: Callable[[], bool] | None = None,
) -> dict[str, bool]:
    """What /readyz checks: Redis answers, the spool is writable (an empty probe file is created
    in the spool's tmp dir and removed), its disk has at least ``min_free_bytes`` free (the
    listener's ``min_free_disk_mb``, below which it refuses C-STOREs), no dispatcher is stuck,
    at least one worker is alive (nothing would be embedded otherwise) and, with an
    ``endpoint`` probe (``probe.EndpointProbe``: cached, so cheap), the endpoint is reachable.
    Without a probe (no endpoint configured in this process) there is no ``endpoint`` check."""
    checks = {
        "redis": False,
        "spool_writable": False,
        "spool_free_disk": False,
        "dispatcher": False,
        "workers": False,
    }
    try:
        checks["redis"] = bool(connection.ping())
        reports = health.reports(connection, health.DISPATCHER).values()
        checks["dispatcher"] = all(report.get("ok") for report in reports)
        checks["workers"] = bool(health.reports(connection, health.WORKER))
    except redis.RedisError:
        pass
    probe = spool_dir / "tmp" / ".readyz"
    try:
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)  # a listener starting meanwhile may clear tmp/ first
        checks["spool_writable"] = True
    except OSError:
        pass
    try:
        checks["spool_free_disk"] = shutil.disk_usage(spool_dir).free >= min_free_bytes
    except OSError:  # no spool dir
        pass
    if endpoint is not None:
        checks["endpoint"] = endpoint()
    return checks
