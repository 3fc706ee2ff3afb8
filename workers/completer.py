"""The push service's loop: complete study versions, turn them into push jobs, clean the spool.

Every :data:`TICK_SECONDS`:

1. study versions that are due and ready complete (``Studies.complete_due``: one Redis script
   each, so two push services never complete one version twice);
2. completed versions in the outbox become one push job per configured sink
   (``pipeline.jobs.enqueue_push``, named by sink, study and version, so a redo after a crash
   enqueues the same job) and leave the outbox only if no newer version replaced them;
3. with no sink configured, a completed version's instances are delivered as far as anything
   goes: ``final`` is called for them (spool retention), and the study completion latency
   (from its last arrival to its completion) is observed in ``metrics``;
4. ``housekeeping`` runs (spool retention's clean-up), at most every :data:`HOUSEKEEPING_SECONDS`.

Redis errors are logged and the loop goes on: everything it acts on is in Redis, so a pass that
failed is simply done again by the next.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import redis
import structlog
from rq import Queue

from pipeline.jobs import enqueue_push
from pipeline.stage_metrics import StageMetrics
from pipeline.studies import Completed, Studies

log = structlog.get_logger(__name__)

TICK_SECONDS = 0.25
HOUSEKEEPING_SECONDS = 2.0


class Completer:
    def __init__(
        self,
        studies: Studies,
        queue: Queue,
        sinks: Sequence[str],
        *,
        final: Callable[[str, int], None] = lambda _study, _version: None,
        housekeeping: Callable[[], object] = lambda: None,
        completed: Callable[[Completed], None] = lambda _done: None,
        metrics: StageMetrics | None = None,
        queue_of: Callable[[str], Queue] | None = None,
    ) -> None:
        """``queue_of(study)``: the push queue of the listener node holding the study's files
        (``queue`` for every study when not given: one node)."""
        self.studies = studies
        self.queue = queue
        self.queue_of = queue_of or (lambda _study: queue)
        self.sinks = list(sinks)
        self.final = final
        self.housekeeping = housekeeping
        self.completed = completed
        self.metrics = metrics
        self._last_housekeeping = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="completer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def tick(self) -> None:
        for done in self.studies.complete_due():
            log.info(
                "study.completed",
                study_instance_uid=done.study_uid,
                version=done.version,
                pending=done.pending,
            )
            self.completed(done)
            if not self.sinks:
                self._time(done)
        for study, version in self.studies.outbox():
            for sink in self.sinks:
                enqueue_push(self.queue_of(study), sink, study, version)
            if self.studies.taken(study, version) and not self.sinks:
                self.final(study, version)
        if time.monotonic() - self._last_housekeeping >= HOUSEKEEPING_SECONDS:
            self._last_housekeeping = time.monotonic()
            self.housekeeping()

    def _time(self, done: Completed) -> None:
        """With no sink, a version is delivered when it completes: observe the latency from its
        last arrival (a Redis error loses the observation, never the completion)."""
        if self.metrics is None:
            return
        try:
            times = self.studies.version_times(done.study_uid, done.version)
        except redis.RedisError as exc:
            log.debug("metrics.read_failed", error=type(exc).__name__)
            return
        if times is not None and times[1] is not None:
            self.metrics.study_completed(times[1] - times[0])

    def _run(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            try:
                self.tick()
            except redis.RedisError as exc:
                log.warning("completer.redis_error", error=type(exc).__name__)
            except Exception:  # never stop completing studies over one bad pass
                log.exception("completer.error")
