"""The /status document, gathered from Redis and the state dir. Counts and UIDs, no PHI."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis
from rq import Queue, Worker

from pipeline import health
from pipeline.intake import IntakeLog
from pipeline.jobs import EMBED_QUEUE
from pipeline.ledger import Ledger


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
    return [
        {"name": worker.name, "state": str(worker.get_state()), "queues": worker.queue_names()}
        for worker in Worker.all(connection=connection)
    ]


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
        "queues": {EMBED_QUEUE: queue_depths(connection)},
        "workers": workers(connection),
        "dispatchers": health.reports(connection, "dispatcher"),
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
    in the spool's tmp dir and removed), no dispatcher is stuck."""
    checks = {"redis": False, "spool_writable": False, "dispatcher": False}
    try:
        checks["redis"] = bool(connection.ping())
        reports = health.reports(connection, "dispatcher").values()
        checks["dispatcher"] = all(report.get("ok") for report in reports)
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
