"""The /status document, gathered from Redis and the state dir. Counts and UIDs, no PHI."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis
from rq import Queue

from pipeline import health, keys
from pipeline.deadletters import DeadLetters
from pipeline.intake import IntakeLog
from pipeline.jobs import EMBED_QUEUE, PUSH_QUEUE
from pipeline.keys import text
from pipeline.ledger import Ledger
from pipeline.studies import Studies


def queue_depths(connection: redis.Redis, name: str = EMBED_QUEUE) -> dict[str, int]:
    queue = Queue(name, connection=connection)
    return {
        "queued": queue.count,
        "started": queue.started_job_registry.count,
        "scheduled": queue.scheduled_job_registry.count,
        "failed": queue.failed_job_registry.count,
        "finished": queue.finished_job_registry.count,
    }


def workers(connection: redis.Redis) -> list[dict[str, Any]]:
    """Live workers, from their own reports (renewed every second by a thread of theirs, so a
    killed worker is gone from here within seconds, unlike rq's registration)."""
    return [
        {"name": name, **report}
        for name, report in sorted(health.reports(connection, health.WORKER).items())
    ]


def studies(connection: redis.Redis, limit: int = 20) -> dict[str, Any]:
    """The most recent studies (by last arrival) with their progress and pushes."""
    versions = Studies(connection)
    found = [versions.progress(uid) for uid in versions.recent(limit)]
    return {"recent": [p.to_json() for p in found if p is not None]}


def sinks(connection: redis.Redis) -> dict[str, Any]:
    """Pushes by sink and outcome, pushes waiting (queued, scheduled for a retry, running) and
    the dead letters, newest first."""
    counts: dict[str, dict[str, int]] = {}
    for field, value in connection.hgetall(keys.PUSH_COUNTS).items():
        sink, _, outcome = text(field).partition("|")
        counts.setdefault(sink, {})[outcome] = int(value)
    letters = DeadLetters(connection)
    return {
        "pushes": counts,
        "pending": sum(queue_depths(connection, PUSH_QUEUE)[k] for k in PENDING),
        "dead_lettered": letters.count(),
        "dead_letters": [letter.to_json() for letter in letters.recent(limit=20)],
    }


#: Push queue registries whose jobs are still to be delivered.
PENDING = ("queued", "started", "scheduled")


def gather(
    connection: redis.Redis,
    ledger: Ledger,
    intake: IntakeLog,
    spool_dir: Path,
    quarantine_dir: Path,
) -> dict[str, Any]:
    """``instances``: current states, adding up to ``received``; ``counters``: cumulative event
    counts; ``input``: what the listener refused or rejected; ``failures`` and ``skipped``: the
    most recent first."""
    return {
        "instances": ledger.counts(),
        "counters": ledger.counters(),
        "input": intake.summary(),
        "queues": {name: queue_depths(connection, name) for name in (EMBED_QUEUE, PUSH_QUEUE)},
        "workers": workers(connection),
        "dispatchers": health.reports(connection, health.DISPATCHER),
        "pushers": health.reports(connection, health.PUSHER),
        "studies": studies(connection),
        "sinks": sinks(connection),
        "failures": [asdict(failure) for failure in ledger.failures(limit=50)],
        "skipped": {"recent": [asdict(skip) for skip in ledger.skips(limit=20)]},
        "spool": {
            "free_bytes": shutil.disk_usage(spool_dir).free if spool_dir.exists() else None,
            "quarantined": sum(1 for _ in quarantine_dir.glob("*.dcm"))
            if quarantine_dir.exists()
            else 0,
        },
    }


def ready(connection: redis.Redis, spool_dir: Path) -> dict[str, bool]:
    """What /readyz checks: Redis answers, the spool is writable (an empty probe file is created
    in the spool's tmp dir and removed), no dispatcher is stuck, at least one worker is alive
    (nothing would be embedded otherwise)."""
    checks = {"redis": False, "spool_writable": False, "dispatcher": False, "workers": False}
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
        probe.unlink()
        checks["spool_writable"] = True
    except OSError:
        pass
    return checks
