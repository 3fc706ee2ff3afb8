"""Start-up reconciliation against a real Redis and rq: every acknowledged instance that is not
final and not really waiting on the queue is submitted again; nothing else is."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from rq import Queue

from dicom_listener.reconcile import reconcile
from dicom_listener.spool import Spool
from pipeline.jobs import EMBED_QUEUE
from pipeline.ledger import Ledger, Stage


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", tmp_path / "quarantine")


def _spooled(spool: Spool, *uids: str) -> None:
    for uid in uids:
        assert spool.write(uid, b"DICM") is not None


def _run(spool: Spool, connection: redis.Redis) -> tuple[dict[str, int], list[str]]:
    submitted: list[Path] = []
    counts = reconcile(spool, Ledger(connection), connection, submitted.append)
    return counts, sorted(Spool.uid_of(path) for path in submitted)


def test_unfinished_instances_are_submitted_final_ones_are_not(
    spool: Spool, redis_conn: redis.Redis
) -> None:
    """Spooled, converting or unknown to the ledger: again. Embedded, skipped, failed: not."""
    ledger = Ledger(redis_conn)
    _spooled(spool, "1.1", "1.2", "1.3", "1.4", "1.5", "1.6")
    ledger.spooled(["1.2", "1.3", "1.4", "1.5", "1.6"])
    ledger.converting(["1.3"])
    ledger.skipped("1.4", "not an image to embed: Modality SR (convert.embed_modalities)")
    ledger.failed("1.5", Stage.CONVERT, "data set is truncated")
    with redis_conn.pipeline() as pipe:
        ledger.mark_embedded(pipe, ["1.6"])
        pipe.execute()
    counts, submitted = _run(spool, redis_conn)
    assert submitted == ["1.1", "1.2", "1.3"]
    assert (counts["spooled"], counts["final"], counts["resubmitted"]) == (6, 3, 3)


def test_a_job_really_on_the_queue_is_left_to_it(spool: Spool, redis_conn: redis.Redis) -> None:
    """An instance whose embed job waits on the queue list is not submitted twice; one whose job
    a killed worker had dequeued (status QUEUED, off the list) is."""
    ledger = Ledger(redis_conn)
    queue = Queue(EMBED_QUEUE, connection=redis_conn)
    _spooled(spool, "2.1", "2.2")
    for uid in ("2.1", "2.2"):
        ledger.spooled([uid])
        ledger.converted(uid, {"series": "2"})
        job = queue.enqueue_call("builtins.print", job_id=f"job-{uid.replace('.', '-')}")
        ledger.queued([uid], job.id)
    redis_conn.lrem(queue.key, 0, "job-2-2")  # dequeued by a worker that then died
    counts, submitted = _run(spool, redis_conn)
    assert submitted == ["2.2"]
    assert (counts["waiting"], counts["resubmitted"]) == (1, 1)


def test_partial_writes_are_removed_and_odd_uids_survive(
    spool: Spool, redis_conn: redis.Redis
) -> None:
    """A crash's partial writes go (never acknowledged); a non-conformant UID, hex-encoded in
    its file name, comes back as itself."""
    (spool.tmp / "crash.part").write_bytes(b"half")
    _spooled(spool, "0A1B2C" * 4)
    counts, submitted = _run(spool, redis_conn)
    assert counts["partial_writes_removed"] == 1 and not any(spool.tmp.iterdir())
    assert submitted == ["0A1B2C" * 4]
