"""Start-up reconciliation: the spool against the ledger.

Everything in the spool was acknowledged. Whatever has not reached a final state, and is not
already waiting in the queue, is submitted again. "Waiting" means really on the queue list,
scheduled for a retry, or started (a dead worker's started job is requeued by the janitors): a
job dequeued but never started still says QUEUED, in rq's intermediate list, and is resubmitted.
Work is idempotent by SOP Instance UID, so an instance done twice costs only time (the worker
skips what the store already has).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
import structlog
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from dicom_listener.spool import Spool
from pipeline.jobs import EMBED_QUEUE
from pipeline.keys import QUEUED, text
from pipeline.ledger import Ledger

log = structlog.get_logger(__name__)

CHUNK = 1000


def reconcile(
    spool: Spool,
    ledger: Ledger,
    connection: redis.Redis,
    submit: Callable[[Path], None],
    *,
    clean: bool = True,
    skip: Collection[str] = (),
) -> dict[str, int]:
    """Resubmit every unfinished spooled instance; return counts for the start-up log.

    ``clean``: first remove the partial writes a crash left — only while no listener runs.
    ``skip``: SOP UIDs on their way already (held by the dispatcher, or on the arrival log)."""
    counts = {
        "partial_writes_removed": spool.clean_tmp() if clean else 0,
        "spooled": 0,
        "final": 0,
        "waiting": 0,
        "on_their_way": 0,
        "resubmitted": 0,
    }
    running = _Running.read(connection)
    chunk: dict[str, Path] = {}
    for path in spool.walk():
        uid = Spool.uid_of(path)
        if uid in skip:
            counts["on_their_way"] += 1
            continue
        chunk[uid] = path
        if len(chunk) >= CHUNK:
            _reconcile_chunk(chunk, ledger, connection, submit, counts, running)
            chunk = {}
    _reconcile_chunk(chunk, ledger, connection, submit, counts, running)
    log.info("reconcile.done", **counts)
    return counts


def _reconcile_chunk(
    paths: dict[str, Path],
    ledger: Ledger,
    connection: redis.Redis,
    submit: Callable[[Path], None],
    counts: dict[str, int],
    running: _Running,
) -> None:
    """``paths``: spooled files by SOP UID."""
    if not paths:
        return
    uids = list(paths)
    final = ledger.final(uids)
    waiting = running.waiting(connection, ledger.jobs_of(uids))
    counts["spooled"] += len(paths)
    for path, is_final, is_waiting in zip(paths.values(), final, waiting, strict=True):
        if is_final:
            counts["final"] += 1
        elif is_waiting:
            counts["waiting"] += 1
        else:
            submit(path)
            counts["resubmitted"] += 1


@dataclass(frozen=True)
class _Running:
    """The embed jobs that will run (again) without us: really on the queue list, scheduled
    for a retry, or started and in the started registry (a live worker finishes it; a dead
    worker's is requeued by the janitors within seconds, workers/janitor.py). A job that only
    *says* queued or started — dequeued but never started, or left so by a worker that lost
    Redis mid-job — is in neither list, and is resubmitted."""

    queued: frozenset[str]
    started: frozenset[str]

    @classmethod
    def read(cls, connection: redis.Redis) -> _Running:
        queue = Queue(EMBED_QUEUE, connection=connection)
        started = StartedJobRegistry(queue=queue).get_job_ids(cleanup=False)
        return cls(frozenset(queue.get_job_ids()), frozenset(started))

    def waiting(self, connection: redis.Redis, job_ids: Sequence[str | None]) -> list[bool]:
        known = sorted({jid for jid in job_ids if jid})
        jobs = dict(zip(known, Job.fetch_many(known, connection=connection), strict=True))
        return [self._waits(jobs.get(jid)) if jid else False for jid in job_ids]

    def _waits(self, job: Job | None) -> bool:
        if job is None:
            return False
        status = job.get_status(refresh=False)
        return (
            status == JobStatus.SCHEDULED
            or (status == JobStatus.STARTED and job.id in self.started)
            or (status == JobStatus.QUEUED and job.id in self.queued)
        )


class Sweeper:
    """Reconciliation while running, for the ``queued`` instances only: one whose job will not
    run (see :class:`_Running`) in two sweeps in a row, and that the dispatcher does not hold,
    is submitted again. The two sweeps let a job that was between dequeue and start settle."""

    def __init__(self, spool: Spool, ledger: Ledger, connection: redis.Redis) -> None:
        self.spool = spool
        self.ledger = ledger
        self.redis = connection
        self.suspects: set[str] = set()

    def sweep(self, held: Callable[[], set[str]], submit: Callable[[Path], None]) -> int:
        """One sweep; returns how many instances it submitted again."""
        uids = sorted(text(u) for u in self.redis.smembers(QUEUED))
        running = _Running.read(self.redis)
        jobs = self.ledger.jobs_of(uids)
        stuck = {
            uid
            for uid, waits in zip(uids, running.waiting(self.redis, jobs), strict=True)
            if not waits
        } - held()
        again = stuck & self.suspects
        self.suspects = stuck - again
        for uid in sorted(again):
            path = self.spool.path_for(uid)
            if path.exists():
                submit(path)
        if again:
            log.warning("reconcile.swept", resubmitted=len(again))
        return len(again)
