"""Wiring for a listener node's dispatcher process (``pacs-embed dispatch``): the dispatcher
with its conversion pool, reconciliation of the spool, and the sweeper.

It runs apart from the listener processes so that conversion and enqueueing never compete for
the GIL with the associations, whose pynetdicom threads wake every millisecond and would each
wait up to a switch interval for it; and at a lower CPU priority (:data:`NICE`), so on a busy
host the associations are served first and the backlog drains after them. The listener
processes hand it what they spooled through Redis (:mod:`.arrivals`).

It reconciles the spool when it starts and whenever a listener process starts (its arrival
log asks), on the dispatcher's own loop, skipping what the loop holds and what is still on the
arrival log: whatever any process held in memory when it died is found again, and nothing that
is on its way is converted twice.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import redis
import structlog
from rq import Queue

from dicom_listener import arrivals
from dicom_listener.dispatcher import Dispatcher, DispatchLimits
from dicom_listener.reconcile import Sweeper, reconcile
from dicom_listener.spool import Spool
from pipeline import health
from pipeline.convert import ConvertOptions
from pipeline.jobs import EMBED_QUEUE, EmbedBatch, enqueue_batch
from pipeline.keys import DEFAULT_NODE
from pipeline.ledger import Ledger
from pipeline.requeue import requested_instances
from pipeline.settings import Settings
from pipeline.stage_metrics import ListenerMetrics
from pipeline.store import EmbeddingStore
from pipeline.studies import Studies

log = structlog.get_logger(__name__)

#: The dispatcher's niceness (its conversion processes inherit it): the listener processes,
#: at 0, get the cores first.
NICE = 10

#: Spooled instances taken from the arrival log per dispatcher loop.
TAKE_LIMIT = 1000

#: How often queued instances are checked for a job that will never run (two checks in a row
#: resubmit one: ``reconcile.Sweeper``).
SWEEP_SECONDS = 10.0


class DispatchHost:
    """start() reconciles (or keeps trying, in a thread), then runs the dispatcher."""

    def __init__(
        self, settings: Settings, connection: redis.Redis, node: str = DEFAULT_NODE
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.node = node
        self._stopping = threading.Event()
        self.spool = Spool(settings.spool_dir, settings.quarantine_dir)
        self.ledger = Ledger(connection)
        self.queue = Queue(EMBED_QUEUE, connection=connection)
        #: Conversions by outcome and time: counted in memory, written with each report.
        self.metrics = ListenerMetrics(connection)
        self.dispatcher = Dispatcher(
            spool=self.spool,
            ledger=self.ledger,
            enqueue=self._enqueue,
            queue_depth=lambda: self.queue.count,
            options=ConvertOptions.from_settings(settings),
            limits=DispatchLimits.from_settings(settings),
            processes=settings.convert.processes,
            log_settings=(settings.log.level, settings.log.format),
            report=self._report,
            arrived=partial(Studies(connection, settings.study).arrived, node=node),
            node=node,
            forget=EmbeddingStore(connection, self.ledger).forget,
            requested=lambda: requested_instances(connection),
            converted=self.metrics.converted,
            spooled=self._spooled,
            reconcile=self._reconcile,
        )

    def _enqueue(self, batch: EmbedBatch) -> str:
        qs = self.settings.queue
        return enqueue_batch(
            self.queue, batch, timeout=qs.job_timeout_seconds, retries=qs.max_retries
        )

    def _spooled(self) -> list[str]:
        """The arrival log, from the dispatcher's loop, with a listener's request to reconcile."""
        uids, reconcile_asked = arrivals.take(self.connection, self.node, TAKE_LIMIT)
        if reconcile_asked:
            self.dispatcher.request_reconcile()
        return uids

    def _reconcile(self, held: set[str], submit: Callable[[Path], None]) -> dict[str, int]:
        """From the dispatcher's loop: everything unfinished in the spool but what the loop
        holds and what is still on the arrival log (it comes that way)."""
        skip = held | arrivals.listed(self.connection, self.node)
        return reconcile(self.spool, self.ledger, self.connection, submit, clean=False, skip=skip)

    def _report(self, report: dict[str, object]) -> None:
        """Every few seconds, from the dispatcher's loop: its health and backlog (which the
        listeners' back-pressure reads), and its counts."""
        health.publish(self.connection, health.DISPATCHER, report)
        arrivals.publish_backlog(self.connection, self.node, int(report["backlog"]))  # type: ignore[call-overload]
        self.metrics.flush()

    def _sweep(self) -> None:
        """Every :data:`SWEEP_SECONDS`: resubmit queued instances whose job will never run (a
        worker lost Redis mid-job, say), found stuck twice in a row (``reconcile.Sweeper``)."""
        sweeper = Sweeper(self.spool, self.ledger, self.connection)
        while not self._stopping.wait(SWEEP_SECONDS):
            try:
                sweeper.sweep(self.dispatcher.held, self.dispatcher.submit)
            except redis.RedisError as exc:
                log.debug("reconcile.sweep_failed", error=type(exc).__name__)

    def start(self) -> None:
        os.nice(NICE)  # before the pool's processes are started: they inherit it
        self.dispatcher.request_reconcile()  # its first loop; retried while Redis is away
        self.dispatcher.start()
        threading.Thread(target=self._sweep, name="sweeper", daemon=True).start()
        log.info("dispatcher.started", node=self.node, processes=self.settings.convert.processes)

    def stop(self) -> None:
        self._stopping.set()
        self.dispatcher.stop()
        self.metrics.flush()
        log.info("dispatcher.stopped")
