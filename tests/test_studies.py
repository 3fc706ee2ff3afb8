"""Study versions (pipeline/studies.py) against a real Redis, on an injected clock: when a
version completes, what the outbox holds, what a push records, and what /studies shows."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import redis

from dicom_listener.retention import Retention
from dicom_listener.spool import Spool
from pipeline import keys
from pipeline.embed.contract import EMBEDDING_DIM
from pipeline.ledger import Ledger, Stage
from pipeline.records import ImageRecord
from pipeline.sections import StudySettings
from pipeline.store import EmbeddingStore
from pipeline.studies import RECHECK_MS, Completed, Studies, StudyState

STUDY = "1.2.826.0.1.3680043.9.7.1"
SERIES = "1.2.826.0.1.3680043.9.7.1.1"
T0 = 1_700_000_000.0
TIMING = StudySettings(stable_seconds=10, max_wait_seconds=60)


class Clock:
    """Seconds since the epoch, moved only by the test."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def sop(n: int) -> str:
    return f"{STUDY}.1.{n}"


class Instances:
    """Puts instances through the ledger's states the way the pipeline does."""

    def __init__(self, connection: redis.Redis) -> None:
        self.ledger = Ledger(connection)
        self.store = EmbeddingStore(connection, self.ledger)

    def record(self, uid: str) -> ImageRecord:
        return ImageRecord(
            sop_instance_uid=uid,
            study_instance_uid=STUDY,
            series_instance_uid=SERIES,
            modality="CT",
            body_part="CHEST",
        )

    def queued(self, uid: str) -> None:
        """Spooled, converted, waiting on the embed queue: not final."""
        self.ledger.spooled([uid])
        self.ledger.converting([uid])
        self.ledger.converted(uid, self.record(uid).instance_fields(), frames=[0])
        self.ledger.queued([uid], "embed-job")

    def embedded(self, uid: str) -> None:
        self.queued(uid)
        vector = np.zeros((1, EMBEDDING_DIM), dtype=np.float32)
        vector[0, 0] = 1.0
        self.store.save([self.record(uid)], vector)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def studies(redis_conn: redis.Redis, clock: Clock) -> Studies:
    return Studies(redis_conn, TIMING, clock=clock)


@pytest.fixture
def instances(redis_conn: redis.Redis) -> Instances:
    return Instances(redis_conn)


def test_completes_after_stable_time_when_every_instance_is_final(
    studies: Studies, instances: Instances, clock: Clock
) -> None:
    """Embedded, skipped and failed all count as final; nothing completes a moment early."""
    studies.arrived([(STUDY, sop(1)), (STUDY, sop(2)), (STUDY, sop(3))])
    instances.embedded(sop(1))
    instances.ledger.skipped(sop(2), "Modality SR is not embedded")
    instances.ledger.failed(sop(3), Stage.CONVERT, "no decoder")
    clock.advance(9.999)
    assert studies.complete_due() == []
    assert studies.completed_version(STUDY) == 0
    clock.advance(0.001)
    assert studies.complete_due() == [Completed(STUDY, 1, 0)]
    assert studies.completed_version(STUDY) == 1
    assert studies.outbox() == [(STUDY, 1)]
    assert studies.complete_due() == []  # done once: no longer due


def test_each_arrival_rearms_the_stable_timer(
    studies: Studies, instances: Instances, clock: Clock
) -> None:
    studies.arrived([(STUDY, sop(1))])
    instances.embedded(sop(1))
    clock.advance(8)
    studies.arrived([(STUDY, sop(2))])
    instances.embedded(sop(2))
    clock.advance(8)  # 16 s after the first, 8 after the last
    assert studies.complete_due() == []
    clock.advance(2)
    assert studies.complete_due() == [Completed(STUDY, 1, 0)]


def test_not_complete_while_an_instance_is_pending_then_rechecked(
    studies: Studies, instances: Instances, clock: Clock, redis_conn: redis.Redis
) -> None:
    studies.arrived([(STUDY, sop(1)), (STUDY, sop(2))])
    instances.embedded(sop(1))
    instances.queued(sop(2))  # converted, still on the embed queue
    clock.advance(10)
    assert studies.complete_due() == []
    assert studies.completed_version(STUDY) == 0
    assert studies.outbox() == []
    # Looked at again RECHECK_MS later, not on every pass.
    recheck = redis_conn.zscore(keys.STUDIES_DUE, STUDY)
    assert recheck == round(clock() * 1000) + RECHECK_MS
    instances.embedded(sop(2))
    clock.advance(RECHECK_MS / 1000 / 2)
    assert studies.complete_due() == []  # not due yet
    clock.advance(RECHECK_MS / 1000 / 2)
    assert studies.complete_due() == [Completed(STUDY, 1, 0)]


def test_max_wait_completes_with_pending_counted(
    studies: Studies, instances: Instances, clock: Clock
) -> None:
    """Arrivals every 8 s never leave 10 s of quiet, and one instance never ends: the version
    completes max_wait (60 s) after it opened all the same, counting the one still pending."""
    studies.arrived([(STUDY, sop(0))])
    instances.queued(sop(0))  # never final
    for n in range(1, 8):
        clock.advance(8)
        studies.arrived([(STUDY, sop(n))])
        instances.embedded(sop(n))
        assert studies.complete_due() == [], f"completed at {clock() - T0} s"
    clock.advance(60 - 56 - 0.001)
    assert studies.complete_due() == []
    clock.advance(0.001)
    assert studies.complete_due() == [Completed(STUDY, 1, pending=1)]
    progress = studies.progress(STUDY)
    assert progress is not None
    assert (progress.received, progress.final, progress.state) == (8, 7, StudyState.COMPLETE)


def test_late_arrival_opens_version_2_which_replaces_1_in_the_outbox(
    studies: Studies, instances: Instances, clock: Clock
) -> None:
    studies.arrived([(STUDY, sop(1))])
    instances.embedded(sop(1))
    clock.advance(10)
    assert studies.complete_due() == [Completed(STUDY, 1, 0)]
    assert studies.outbox() == [(STUDY, 1)]

    clock.advance(100)  # a late series
    studies.arrived([(STUDY, sop(2))])
    assert studies.current_version(STUDY) == 2
    assert studies.completed_version(STUDY) == 1
    progress = studies.progress(STUDY)
    assert progress is not None and progress.state == StudyState.OPEN
    assert not progress.to_json()["complete"]
    instances.embedded(sop(2))
    clock.advance(10)
    assert studies.complete_due() == [Completed(STUDY, 2, 0)]
    assert studies.outbox() == [(STUDY, 2)]
    # Whoever read version 1 from the outbox before must not remove version 2.
    assert studies.taken(STUDY, 1) is False
    assert studies.outbox() == [(STUDY, 2)]
    assert studies.taken(STUDY, 2) is True
    assert studies.outbox() == []
    assert studies.taken(STUDY, 2) is False
    assert studies.members(STUDY) == [sop(1), sop(2)]


def test_resend_of_a_member_also_opens_the_next_version(
    studies: Studies, instances: Instances, clock: Clock
) -> None:
    studies.arrived([(STUDY, sop(1))])
    instances.embedded(sop(1))
    clock.advance(10)
    studies.complete_due()
    clock.advance(1)
    studies.arrived([(STUDY, sop(1))])  # a correction of the same instance
    assert studies.current_version(STUDY) == 2
    assert studies.members(STUDY) == [sop(1)]


def test_two_callers_complete_each_version_once(
    redis_server: str, redis_conn: redis.Redis, instances: Instances, clock: Clock
) -> None:
    """Two push services (own connections, own threads) checking at once: every study
    completes exactly once between them."""
    uids = [f"{STUDY}.{n}" for n in range(60)]
    Studies(redis_conn, TIMING, clock=clock).arrived([(uid, f"{uid}.1") for uid in uids])
    for uid in uids:
        instances.ledger.skipped(f"{uid}.1", "Modality SR is not embedded")
    clock.advance(10)
    connections = [redis.Redis.from_url(redis_server) for _ in range(2)]
    callers = [Studies(conn, TIMING, clock=clock) for conn in connections]
    results: list[list[Completed]] = [[], []]
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait()
        for _ in range(5):
            results[i].extend(callers[i].complete_due(limit=1000))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    for conn in connections:
        conn.close()
    completed = [done.study_uid for done in results[0] + results[1]]
    assert sorted(completed) == sorted(uids)
    assert {done.version for done in results[0] + results[1]} == {1}
    assert len(Studies(redis_conn, TIMING, clock=clock).outbox(limit=1000)) == 60


def test_pushed_records_only_forward(studies: Studies) -> None:
    studies.arrived([(STUDY, sop(1))])
    assert studies.pushed_version(STUDY, "dicom") == 0
    assert studies.pushed(STUDY, "dicom", 2) is True
    assert studies.pushed(STUDY, "dicom", 2) is False  # a redo
    assert studies.pushed(STUDY, "dicom", 1) is False  # a late, older push
    assert studies.pushed_version(STUDY, "dicom") == 2
    assert studies.pushed(STUDY, "webhook", 1) is True  # per sink
    assert studies.pushed_version(STUDY, "webhook") == 1
    assert studies.pushed(STUDY, "dicom", 3) is True
    assert studies.pushed_version(STUDY, "dicom") == 3


def test_progress_numbers(studies: Studies, instances: Instances, clock: Clock) -> None:
    assert studies.progress(STUDY) is None
    studies.arrived([(STUDY, sop(1)), (STUDY, sop(2))])
    clock.advance(4)
    studies.arrived([(STUDY, sop(3))])
    instances.embedded(sop(1))
    instances.ledger.skipped(sop(2), "Modality SR is not embedded")
    instances.queued(sop(3))
    progress = studies.progress(STUDY)
    assert progress is not None
    assert progress.to_json() == {
        "study_instance_uid": STUDY,
        "version": 1,
        "state": "open",
        "received": 3,
        "final": 2,
        "complete": False,
        "completed_version": 0,
        "opened": T0,
        "last_arrival": T0 + 4,
        "completed": None,
        "pushed": {},
    }
    instances.embedded(sop(3))
    clock.advance(10)
    studies.complete_due()
    studies.pushed(STUDY, "webhook", 1)
    progress = studies.progress(STUDY)
    assert progress is not None
    doc = progress.to_json()
    assert (doc["state"], doc["final"], doc["complete"], doc["completed_version"]) == (
        "complete",
        3,
        True,
        1,
    )
    assert doc["completed"] == T0 + 14
    assert doc["pushed"] == {"webhook": 1}
    # ``final`` from the caller is taken as given.
    given = studies.progress(STUDY, final=[True, False, False])
    assert given is not None and given.final == 1


def test_recent_is_by_latest_arrival(studies: Studies, clock: Clock) -> None:
    studies.arrived([("1.2.1", "1.2.1.1")])
    clock.advance(1)
    studies.arrived([("1.2.2", "1.2.2.1")])
    clock.advance(1)
    studies.arrived([("1.2.1", "1.2.1.2")])
    assert studies.recent() == ["1.2.1", "1.2.2"]
    assert studies.recent(limit=1) == ["1.2.1"]


def test_arrival_takes_the_instance_out_of_retention(
    studies: Studies, redis_conn: redis.Redis, clock: Clock, tmp_path: Path
) -> None:
    retention = Retention(
        Spool(tmp_path / "spool", tmp_path / "quarantine"),
        redis_conn,
        hours=1,
        low_free_bytes=0,
        clock=clock,
    )
    retention.eligible([sop(1), sop(2)])
    assert retention.pending() == 2
    studies.arrived([(STUDY, sop(1))])
    assert redis_conn.zscore(keys.RETENTION, sop(1)) is None
    assert redis_conn.zscore(keys.RETENTION, sop(2)) is not None
    assert retention.pending() == 1
