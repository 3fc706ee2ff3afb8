"""`pacs-embed worker` and `pacs-embed push`: one process serving one rq queue.

The services (endpoint client, store, ledger, detector; or the sinks) are built by the process's
composition root (``pacs_embed.compose``); this module only binds them and serves the queue,
beside the janitor thread that keeps the fleet moving when a worker dies (``workers.janitor``)
and, for the push service, the completer that turns complete study versions into push jobs
(``workers.completer``).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import redis
import structlog
from rq import Queue, SimpleWorker
from rq.job import Job

from pipeline import health
from pipeline.jobs import EMBED_QUEUE, EmbedBatch
from workers import runtime
from workers.completer import Completer
from workers.janitor import GiveUp, Janitor, worker_name
from workers.overlap import OverlappingWorker
from workers.push import PushService
from workers.service import EmbedService

log = structlog.get_logger(__name__)


def run_worker(
    connection: redis.Redis,
    service: EmbedService,
    *,
    burst: bool = False,
    endpoint: str | None = None,
    concurrency: int = 1,
) -> None:
    """Serve embed jobs with ``service``, ``concurrency`` at once (``workers.overlap``), until
    stopped (SIGTERM/SIGINT finish the jobs running); ``endpoint`` (its URL) is only logged."""
    runtime.bind(service)

    def give_up(job: Job, reason: str) -> None:
        service.give_up(EmbedBatch.from_payload(job.args[0]), reason)

    log.info("worker.started", name=worker_name(), endpoint=endpoint, concurrency=concurrency)
    _serve(
        connection,
        EMBED_QUEUE,
        health.WORKER,
        give_up,
        burst=burst,
        make_worker=lambda queue: OverlappingWorker(
            [queue], connection=connection, name=worker_name(), concurrency=concurrency
        ),
    )


def run_pusher(
    connection: redis.Redis, service: PushService, completer: Completer, queue_name: str
) -> None:
    """Serve push jobs (of this listener node's queue) with ``service`` and complete study
    versions until stopped."""
    runtime.bind_pusher(service)

    def give_up(job: Job, reason: str) -> None:
        sink, study, version = job.args
        service.dead_letter(job.id, sink, study, version, reason)

    log.info("pusher.started", name=worker_name(), sinks=service.sinks)
    completer.start()
    try:
        _serve(connection, queue_name, health.PUSHER, give_up)
    finally:
        completer.stop()


def _serve(
    connection: redis.Redis,
    queue_name: str,
    component: str,
    give_up: GiveUp,
    *,
    burst: bool = False,
    make_worker: Callable[[Queue], SimpleWorker] | None = None,
) -> None:
    """SimpleWorker runs jobs in this process: no fork per job (~15 ms each) and HTTP clients
    keep their connections warm across jobs; ``make_worker`` builds another kind (the embed
    worker's runs a few jobs at once). The worker is named ``host:pid``, like its endpoint
    leases and health report, so whoever finds it dead knows what to release. rq's own scheduler
    (a forked process whose lock outlives a killed worker) is replaced by the janitor's.

    Redis going away does not end the process: rq's loop gives up on it, so the worker waits for
    Redis and starts serving again (a process that exited would be restarted by `run` after a
    growing pause, and a worker host without `run` would stay down)."""
    queue = Queue(queue_name, connection=connection)
    while True:
        _wait_for_redis(connection)
        if make_worker is not None:
            worker = make_worker(queue)
        else:
            worker = SimpleWorker([queue], connection=connection, name=worker_name())
        janitor = Janitor(
            connection,
            queue,
            running_jobs=_running_jobs(worker),
            give_up=give_up,
            component=component,
        )
        try:
            _forget_registration(connection, worker)
            janitor.start()
            worker.work(burst=burst, with_scheduler=False, logging_level="WARNING")
        except redis.RedisError as exc:
            log.warning("worker.redis_lost", error=type(exc).__name__)
        finally:
            janitor.stop()
            # rq's handlers outlive its loop; while waiting for Redis, a stop is just an exit.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        # Asked to stop (SIGTERM/SIGINT: rq notes when), or done; else rq's loop gave up on an
        # error (Redis away), and the worker serves again once Redis answers.
        if burst or worker._stop_requested or worker._shutdown_requested_date is not None:
            return
        log.warning("worker.restarting", reason="rq's loop ended without a stop request")


def _running_jobs(worker: SimpleWorker) -> Callable[[], list[str]]:
    """What the janitor reports running: every job of an overlapping worker, else rq's one."""
    if isinstance(worker, OverlappingWorker):
        return worker.running_jobs

    def current() -> list[str]:
        job = worker.get_current_job_id()
        return [job] if job else []

    return current


def _wait_for_redis(connection: redis.Redis) -> None:
    pause = 0.25
    while True:
        try:
            connection.ping()
            return
        except redis.RedisError as exc:
            log.warning("worker.waiting_for_redis", error=type(exc).__name__)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def _forget_registration(connection: redis.Redis, worker: SimpleWorker) -> None:
    """A registration this process left when rq's loop ended on a Redis error (no death
    recorded): rq would refuse to register the same name again."""
    if connection.exists(worker.key) and not connection.hexists(worker.key, "death"):
        connection.delete(worker.key)
