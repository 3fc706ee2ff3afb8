"""An rq worker that runs a few jobs at once, each in a thread of its own.

Why: an embed job spends time outside its HTTP request — reading what the store already has,
encoding the body, scoring verdicts, the store's transaction, growing the references, rq's own
bookkeeping — and a worker running one job at a time leaves its endpoint slot idle meanwhile
(measured with py-spy: 50-90 ms per job on an idle host, 100-250 ms with the fleet and the
endpoint sharing two cores). With two jobs at once, one request is on the wire while the other
job is prepared or finished. Requests on the wire stay bounded by the fleet-wide in-flight
limiter (``pipeline.embed.limiter``): more jobs at once means more waiting for a slot, never a
429.

rq's semantics are kept (rq 3 records several executions per worker):

* the loop dequeues a job only when one of the ``concurrency`` threads is free, and registers
  it started (its execution created) before its thread starts: a job this worker took is
  either running in a thread or not taken at all, never held back in memory, so a crash leaves
  nothing that the janitor or `run` does not put back on the queue (``workers.janitor``);
* :meth:`running_jobs` lists every job running, for the janitor's report, so a live worker's
  second job is never taken for an orphan;
* a warm shutdown (SIGTERM) stops dequeueing and waits for the jobs running (:meth:`teardown`);
  a second signal exits at once, and the jobs go back to the queue like a dead worker's;
* job timeouts raise in the job's own thread (rq's ``TimerDeathPenalty``): ``SIGALRM``, rq's
  default, reaches only the main thread;
* a job flagged :data:`RUN_ALONE` (its worker died while it ran beside others, so which one
  killed it is not known) starts once the jobs already running have ended, and nothing else
  starts beside it: a death then is its own, and only such deaths count against a job
  (``workers.janitor``), so a batch that kills its worker cannot take innocent ones down with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import structlog
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.timeouts import TimerDeathPenalty

log = structlog.get_logger(__name__)

#: How often a wait for a free thread wakes, so the main thread notices signals promptly.
WAKE_SECONDS = 0.5

#: ``job.meta`` key: run this job with no other beside it (set by the janitor).
RUN_ALONE = "run_alone"


class OverlappingWorker(SimpleWorker):
    """A ``SimpleWorker`` (no fork per job, warm HTTP pool) running up to ``concurrency`` jobs
    at once; ``concurrency=1`` behaves like ``SimpleWorker`` but runs the job in a thread."""

    death_penalty_class = TimerDeathPenalty

    def __init__(self, *args: Any, concurrency: int = 1, **kwargs: Any) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        super().__init__(*args, **kwargs)
        self.concurrency = concurrency
        self._changed = threading.Condition()
        self._running: dict[threading.Thread, str] = {}

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Start ``job`` in a thread (registered started first), then return once a thread is
        free: rq's loop dequeues the next job only then."""
        alone = bool(job.meta.get(RUN_ALONE))
        execution = self.prepare_execution(job)
        thread = threading.Thread(
            target=self._perform,
            args=(job, queue, execution, alone),
            name=f"job-{job.id[-12:]}",
            daemon=True,  # a cold shutdown must not wait; the janitor requeues what was running
        )
        with self._changed:
            self._running[thread] = job.id
        thread.start()
        if alone:  # nothing else is taken until it has run
            self._wait_until(lambda: not self._running)
        else:
            self._wait_until(lambda: len(self._running) < self.concurrency)

    def running_jobs(self) -> list[str]:
        """The ids of the jobs running now (for the janitor's report)."""
        with self._changed:
            return list(self._running.values())

    def teardown(self) -> None:
        """Let the jobs running finish (a warm shutdown), then unregister as rq does."""
        self._wait_until(lambda: not self._running)
        super().teardown()  # type: ignore[no-untyped-call]

    def _perform(self, job: Job, queue: Queue, execution: Execution, alone: bool) -> None:
        if alone:  # registered started (a crash meanwhile requeues it), and waits its turn
            me = threading.current_thread()
            self._wait_until(lambda: list(self._running) == [me])
            log.info("worker.job_runs_alone", job_id=job.id)
        try:
            # rq's perform_job records success, retry or failure itself (and never raises for
            # the job's own errors); what escapes is Redis failing under that bookkeeping, and
            # the janitor requeues a job whose execution outlives its thread.
            self.perform_job(job, queue, execution)
        except Exception as exc:
            log.error("worker.job_bookkeeping_failed", job_id=job.id, error=type(exc).__name__)
        finally:
            with self._changed:
                self._running.pop(threading.current_thread(), None)
                self._changed.notify_all()

    def _wait_until(self, done: Callable[[], bool]) -> None:
        with self._changed:
            while not done():
                self._changed.wait(WAKE_SECONDS)
