"""`pacs-embed worker` and `pacs-embed push`: one process serving one rq queue.

The services (endpoint client, store, ledger, detector; or the sinks) are built by the process's
composition root (``pacs_embed.compose``); this module only binds them and serves the queue,
beside the janitor thread that keeps the fleet moving when a worker dies (``workers.janitor``)
and, for the push service, the completer that turns complete study versions into push jobs
(``workers.completer``).
"""

from __future__ import annotations

import redis
import structlog
from rq import Queue, SimpleWorker
from rq.job import Job

from pipeline import health
from pipeline.jobs import EMBED_QUEUE, PUSH_QUEUE, EmbedBatch
from workers import runtime
from workers.completer import Completer
from workers.janitor import GiveUp, Janitor, worker_name
from workers.push import PushService
from workers.service import EmbedService

log = structlog.get_logger(__name__)


def run_worker(
    connection: redis.Redis,
    service: EmbedService,
    *,
    burst: bool = False,
    endpoint: str | None = None,
) -> None:
    """Serve embed jobs with ``service`` until stopped (SIGTERM/SIGINT finish the current job);
    ``endpoint`` (its URL) is only logged."""
    runtime.bind(service)

    def give_up(job: Job, reason: str) -> None:
        service.give_up(EmbedBatch.from_payload(job.args[0]), reason)

    log.info("worker.started", name=worker_name(), endpoint=endpoint)
    _serve(connection, EMBED_QUEUE, health.WORKER, give_up, burst=burst)


def run_pusher(connection: redis.Redis, service: PushService, completer: Completer) -> None:
    """Serve push jobs with ``service`` and complete study versions until stopped."""
    runtime.bind_pusher(service)

    def give_up(job: Job, reason: str) -> None:
        sink, study, version = job.args
        service.dead_letter(job.id, sink, study, version, reason)

    log.info("pusher.started", name=worker_name(), sinks=service.sinks)
    completer.start()
    try:
        _serve(connection, PUSH_QUEUE, health.PUSHER, give_up)
    finally:
        completer.stop()


def _serve(
    connection: redis.Redis,
    queue_name: str,
    component: str,
    give_up: GiveUp,
    *,
    burst: bool = False,
) -> None:
    """SimpleWorker runs jobs in this process: no fork per job (~15 ms each) and HTTP clients
    keep their connections warm across jobs. The worker is named ``host:pid``, like its endpoint
    leases and health report, so whoever finds it dead knows what to release. rq's own scheduler
    (a forked process whose lock outlives a killed worker) is replaced by the janitor's."""
    queue = Queue(queue_name, connection=connection)
    worker = SimpleWorker([queue], connection=connection, name=worker_name())
    janitor = Janitor(
        connection,
        queue,
        current_job=worker.get_current_job_id,
        give_up=give_up,
        component=component,
    )
    janitor.start()
    try:
        worker.work(burst=burst, with_scheduler=False, logging_level="WARNING")
    finally:
        janitor.stop()
