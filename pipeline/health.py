"""Process health in Redis, so an admin on another process (or host) can see a stuck stage.

A process publishes a small report every few seconds under a key that expires; the admin reads
them all. A report says whether the process's loop is making progress (``ok``) and, if not, for
how long and with which exception type — never a message text, which could quote data.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import redis
import structlog

from pipeline.keys import health_key, text

log = structlog.get_logger(__name__)

#: The components that report: each listener's dispatcher loop, each embed worker and each push
#: worker (their janitors), and each listener (its open associations, with the dispatcher's).
DISPATCHER = "dispatcher"
WORKER = "worker"
PUSHER = "pusher"
LISTENER = "listener"

#: How long a report stands without being renewed: a few publish intervals.
TTL_SECONDS = 15


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def publish(
    connection: redis.Redis, component: str, report: dict[str, Any], ttl: int = TTL_SECONDS
) -> None:
    """Renew this process's report for ``ttl`` seconds; a Redis outage is only logged (it shows
    as no report)."""
    try:
        connection.set(health_key(component, process_name()), json.dumps(report), ex=ttl)
    except redis.RedisError as exc:
        log.debug("health.unpublished", component=component, error=type(exc).__name__)


def jobs(report: dict[str, Any]) -> list[str]:
    """The jobs a worker's or pusher's report says it runs: ``jobs``, or the single ``job`` of
    a report written before workers ran several at once."""
    running = report.get("jobs")
    if isinstance(running, list):
        return [str(job) for job in running]
    job = report.get("job")
    return [str(job)] if job else []


def forget(connection: redis.Redis, component: str, name: str) -> None:
    """Withdraw process ``name``'s report (it stopped, or was found dead)."""
    connection.delete(health_key(component, name))


def reports(connection: redis.Redis, component: str) -> dict[str, dict[str, Any]]:
    """Every live report of ``component``, by process name."""
    keys = sorted(connection.scan_iter(match=health_key(component, "*")))
    values = connection.mget(keys) if keys else []
    prefix = health_key(component, "")
    return {
        text(key).removeprefix(prefix): json.loads(value)
        for key, value in zip(keys, values, strict=True)
        if value is not None
    }
