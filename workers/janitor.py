"""Each worker's janitor thread: says the worker is alive, recovers a dead worker's job at once,
and runs rq's scheduler — so neither a ``kill -9`` nor a restart stalls the queue.

rq alone recovers the job of a killed worker only when the job's registry entry expires (the
job timeout plus a minute, 16 minutes by default) and the next maintenance pass runs; the dead
worker shows ``busy`` meanwhile and its in-flight lease holds an endpoint slot. And rq's own
scheduler lives in a forked process whose lock outlives a killed worker, so retries waited for
the next maintenance pass, 10 minutes or more. (docs/architecture.md §3.)

So every worker runs one small thread that, every :data:`TICK_SECONDS`:

1. renews its health report (``pe:health:worker:<host:pid>``, expiring in :data:`ALIVE_SECONDS`),
   written from this thread, so a worker busy in a long request still shows alive; it lists
   every job the worker runs (``jobs``: a worker runs a few at once, ``workers.overlap``);
2. looks at the queue's started jobs: a job whose worker has no live report is requeued at
   the front (:func:`reap`), the dead worker's rq registration and endpoint leases dropped; so
   is one whose live worker has not reported running it for :data:`ORPHAN_SECONDS` (it lost
   Redis mid-job, and its rq loop started over without it). A worker registers a job started
   only as it starts it in a thread, so a started job of a live worker that its report lists is
   really running. A job
   whose workers died :data:`MAX_WORKER_DEATHS` times is failed instead (a batch that kills its
   worker, by memory or a native crash, must not take the fleet down one worker at a time).
   Only a death while the job ran alone counts: a worker that died running several jobs at
   once (``workers.overlap``) does not say which one killed it, so each of them is requeued
   flagged to run alone next time, at no cost; the flag stays, so each such job is suspected
   once at most, and a batch that kills every worker it runs in is failed after its own
   :data:`MAX_WORKER_DEATHS`, alone, while the batches beside it go on;
3. holds its queue's scheduler lock (``pe:scheduler:<queue>``, a few seconds, renewed) or takes
   it when free, and its holder moves due retries from rq's scheduled registry onto the queue.
   A stopped worker releases the lock; a killed one loses it within seconds.

``pacs-embed run`` also calls :func:`reap` the moment it sees a worker die, before any report
lapses. Requeueing twice is prevented by the registry: only the caller whose ``ZREM`` of the
job's entry succeeds requeues it. A job redone after a worker died costs nothing twice: the
store skips images it already has (workers/service.py).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import redis
import structlog
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.scheduler import RQScheduler
from rq.utils import parse_composite_key
from rq.worker import Worker

from pipeline import health
from pipeline.embed.limiter import drop_leases_of
from pipeline.keys import scheduler_lock, text
from workers.overlap import RUN_ALONE

log = structlog.get_logger(__name__)

#: How often the janitor runs.
TICK_SECONDS = 1.0

#: A worker whose report is older than this is dead: a few ticks, so a busy host is not taken
#: for dead, and a killed worker's job moves on within seconds.
ALIVE_SECONDS = 5

#: A started job its live worker has not reported running for this long was orphaned (the
#: worker lost Redis mid-job and started over): it is requeued like a dead worker's.
ORPHAN_SECONDS = 2 * ALIVE_SECONDS

#: How long a scheduler lock lasts without renewal.
SCHEDULER_LOCK_SECONDS = 5

#: After this many worker deaths on one job, the job is failed rather than requeued again.
MAX_WORKER_DEATHS = 3

#: ``job.meta`` key: how many times a worker died while running the job alone.
WORKER_DEATHS = "worker_deaths"

#: How long a failed job stays in rq's failed registry (the ledger holds the failure).
FAILED_TTL_SECONDS = 7 * 24 * 3600

#: Called with a job the janitor gave up on, and the reason (the worker records the failure).
GiveUp = Callable[[Job, str], None]


def worker_name() -> str:
    """This process's worker name: ``host:pid``, the same name its leases and report carry."""
    return health.process_name()


def name_of(pid: int, host: str | None = None) -> str:
    """The worker name of process ``pid`` on ``host`` (this host by default)."""
    return f"{host or socket.gethostname()}:{pid}"


def reap(
    connection: redis.Redis,
    queue: Queue,
    *,
    dead: Callable[[str], bool],
    orphaned: Callable[[str, str, float], bool] = lambda _worker, _job, _started: False,
    give_up: GiveUp | None = None,
    component: str = health.WORKER,
) -> int:
    """Requeue (at the front) every started job of ``queue`` whose worker is ``dead`` — and
    drop those workers' registrations, reports and leases — or that its live worker no longer
    runs (``orphaned(worker, job id, started at)``: it lost Redis mid-job and started over).
    Returns the number of jobs recovered."""
    registry = StartedJobRegistry(queue=queue)
    recovered = 0
    gone: set[str] = set()
    started_jobs = []
    for entry in [text(e) for e in connection.zrange(registry.key, 0, -1)]:
        job_id, execution_id = parse_composite_key(entry)
        name, started = _execution(connection, job_id, execution_id)
        if name:
            started_jobs.append((entry, job_id, name, started))
    running = Counter(name for _entry, _job_id, name, _started in started_jobs)
    for entry, job_id, name, started in started_jobs:
        is_dead = dead(name)
        if not is_dead and not orphaned(name, job_id, started):
            continue
        if not connection.zrem(registry.key, entry):
            continue  # another janitor (or `run`) took it first
        if is_dead:
            gone.add(name)
        try:
            job = Job.fetch(job_id, connection=connection)
        except NoSuchJobError:
            continue
        suspect = is_dead and running[name] > 1  # it may not be what killed its worker
        recovered += _recover(connection, queue, job, name, give_up, suspect=suspect)
    for name in gone:
        forget(connection, name, component)
    return recovered


def _execution(connection: redis.Redis, job_id: str, execution_id: str) -> tuple[str, float]:
    """The worker running a job's execution and when it started it, as rq records them ("" if
    that record is gone)."""
    try:
        execution = Execution.fetch(execution_id, job_id, connection)
    except ValueError:
        return "", 0.0
    return execution.worker_name, execution.created_at.timestamp()


def _recover(
    connection: redis.Redis,
    queue: Queue,
    job: Job,
    worker: str,
    give_up: GiveUp | None,
    *,
    suspect: bool = False,
) -> int:
    """Requeue ``job`` at the front, or fail it at its last death. A ``suspect`` (its worker
    ran other jobs too) is flagged to run alone instead of counting the death."""
    if suspect:
        job.meta[RUN_ALONE] = True
        job.save_meta()  # type: ignore[no-untyped-call]
        queue.enqueue_job(job, at_front=True)
        log.warning("janitor.job_requeued_to_run_alone", job_id=job.id, dead_worker=worker)
        return 1
    deaths = int(job.meta.get(WORKER_DEATHS, 0)) + 1
    job.meta[WORKER_DEATHS] = deaths
    job.save_meta()  # type: ignore[no-untyped-call]
    if deaths >= MAX_WORKER_DEATHS:
        reason = f"its worker died {deaths} times while running it (killed, out of memory?)"
        log.error("janitor.job_failed", job_id=job.id, worker=worker, deaths=deaths)
        FailedJobRegistry(queue=queue).add(job, ttl=FAILED_TTL_SECONDS, exc_string=reason)
        job.set_status(JobStatus.FAILED)
        if give_up is not None:
            give_up(job, reason)
        return 0
    queue.enqueue_job(job, at_front=True)
    log.warning("janitor.job_requeued", job_id=job.id, dead_worker=worker, deaths=deaths)
    return 1


def forget(connection: redis.Redis, name: str, component: str = health.WORKER) -> None:
    """Drop a dead worker's rq registration, health report and endpoint leases."""
    key = f"{Worker.redis_worker_namespace_prefix}{name}"
    if connection.exists(key):
        found = Worker.find_by_key(key, connection=connection)
        if found is not None:
            found.register_death()  # type: ignore[no-untyped-call]
    health.forget(connection, component, name)
    released = drop_leases_of(connection, name)
    log.info("janitor.worker_forgotten", worker=name, leases_released=released)


class SchedulerLock:
    """``pe:scheduler:<queue>``: who moves due retries onto the queue. Short-lived and renewed, so a
    killed holder is replaced within seconds; released on a clean stop."""

    _RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
    _RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

    def __init__(self, connection: redis.Redis, queue: str, holder: str) -> None:
        self.key = scheduler_lock(queue)
        self.holder = f"{holder}:{uuid.uuid4().hex[:8]}"
        self._renew = connection.register_script(self._RENEW)
        self._release = connection.register_script(self._RELEASE)

    def hold(self) -> bool:
        """Take or renew the lock; True while this process holds it."""
        ms = SCHEDULER_LOCK_SECONDS * 1000
        return bool(self._renew(keys=[self.key], args=[self.holder, ms]))

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.holder])


class Janitor:
    """The thread described in the module docstring, one per worker process."""

    def __init__(
        self,
        connection: redis.Redis,
        queue: Queue,
        *,
        running_jobs: Callable[[], list[str]] = list,
        give_up: GiveUp | None = None,
        component: str = health.WORKER,
    ) -> None:
        self.connection = connection
        self.queue = queue
        self.component = component
        self.name = worker_name()
        self.running_jobs = running_jobs
        self.give_up = give_up
        self.started = time.time()
        self.lock = SchedulerLock(connection, queue.name, self.name)
        self.scheduler = RQScheduler([queue], connection=connection)
        self.scheduler.prepare_registries([queue.name])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="janitor", daemon=True)

    def start(self) -> None:
        """Report alive first (so no other janitor takes this worker's first job for a dead
        worker's), then tick in the background."""
        self.report()
        self._thread.start()

    def stop(self) -> None:
        """Stop ticking; give the scheduler lock back and withdraw the report."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            self.lock.release()
            health.forget(self.connection, self.component, self.name)
        except redis.RedisError as exc:
            log.warning("janitor.stop_incomplete", error=type(exc).__name__)

    def report(self) -> None:
        jobs = self.running_jobs()
        health.publish(
            self.connection,
            self.component,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "state": "busy" if jobs else "idle",
                "jobs": jobs,
                "since": self.started,
                "at": time.time(),
            },
            ttl=ALIVE_SECONDS,
        )

    def tick(self) -> None:
        """One round: report, reap, schedule."""
        self.report()
        reports = health.reports(self.connection, self.component)
        living = set(reports) | {self.name}

        def orphaned(worker: str, job: str, started: float) -> bool:
            return job not in health.jobs(reports.get(worker, {})) and (
                time.time() - started > ORPHAN_SECONDS
            )

        reap(
            self.connection,
            self.queue,
            dead=lambda n: n not in living,
            orphaned=orphaned,
            give_up=self.give_up,
            component=self.component,
        )
        if self.lock.hold():
            self.scheduler.enqueue_scheduled_jobs()  # type: ignore[no-untyped-call]

    def _run(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            try:
                self.tick()
            except redis.RedisError as exc:  # Redis away: the worker's loop says so too
                log.debug("janitor.redis_error", error=type(exc).__name__)
            except Exception:  # never let the janitor die: it is what recovers the others
                log.exception("janitor.error")
