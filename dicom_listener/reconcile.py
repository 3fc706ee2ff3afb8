"""Start-up reconciliation: the spool against the ledger.

Everything in the spool was acknowledged. Whatever has not reached a final state, and is not
already waiting in the queue, is submitted again. "Waiting" means really on the queue list (or
scheduled for a retry): a job a killed worker had dequeued still says QUEUED, in rq's
intermediate list, until rq's own maintenance notices a minute or so later. Work is idempotent by
SOP Instance UID, so an instance whose job was running when the host died is simply done again
(the worker skips what the store already has).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import redis
import structlog
from rq import Queue
from rq.job import Job, JobStatus

from dicom_listener.spool import Spool
from pipeline.jobs import EMBED_QUEUE
from pipeline.ledger import Ledger

log = structlog.get_logger(__name__)

CHUNK = 1000


def reconcile(
    spool: Spool, ledger: Ledger, connection: redis.Redis, submit: Callable[[Path], None]
) -> dict[str, int]:
    """Resubmit every unfinished spooled instance; return counts for the start-up log."""
    counts = {
        "partial_writes_removed": spool.clean_tmp(),
        "spooled": 0,
        "final": 0,
        "waiting": 0,
        "resubmitted": 0,
    }
    queued = set(Queue(EMBED_QUEUE, connection=connection).get_job_ids())
    chunk: list[Path] = []
    for path in spool.walk():
        chunk.append(path)
        if len(chunk) >= CHUNK:
            _reconcile_chunk(chunk, ledger, connection, submit, counts, queued)
            chunk = []
    _reconcile_chunk(chunk, ledger, connection, submit, counts, queued)
    log.info("reconcile.done", **counts)
    return counts


def _reconcile_chunk(
    paths: list[Path],
    ledger: Ledger,
    connection: redis.Redis,
    submit: Callable[[Path], None],
    counts: dict[str, int],
    queued: set[str],
) -> None:
    if not paths:
        return
    uids = [Spool.uid_of(path) for path in paths]
    final = ledger.final(uids)
    job_ids = ledger.jobs_of(uids)
    known = sorted({jid for jid in job_ids if jid})
    jobs = dict(zip(known, Job.fetch_many(known, connection=connection), strict=True))
    counts["spooled"] += len(paths)
    for path, is_final, jid in zip(paths, final, job_ids, strict=True):
        if is_final:
            counts["final"] += 1
            continue
        job = jobs.get(jid) if jid else None
        if job is not None and _waiting(job, queued):
            counts["waiting"] += 1
            continue
        submit(path)
        counts["resubmitted"] += 1


def _waiting(job: Job, queued: set[str]) -> bool:
    status = job.get_status(refresh=False)
    return status == JobStatus.SCHEDULED or (status == JobStatus.QUEUED and job.id in queued)
