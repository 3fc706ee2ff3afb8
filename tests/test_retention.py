"""Spool retention (dicom_listener/retention.py) on real files and a real Redis: delivered
instances' files go after the retention, earlier (oldest eligible first) while the disk is
short, never while the instance is being read for a newer version."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from dicom_listener import retention as retention_module
from dicom_listener.retention import Retention
from dicom_listener.spool import Spool
from pipeline.sections import StudySettings
from pipeline.studies import Studies
from tests.test_studies import Clock

HOUR = 3600.0
FILE_BYTES = 100


class SmallDisk(Spool):
    """A spool on a disk of ``capacity`` bytes that holds nothing but the spooled files."""

    capacity = 0

    def free_bytes(self) -> int:
        return self.capacity - sum(path.stat().st_size for path in self.walk())


def spooled(spool: Spool, *uids: str) -> list[str]:
    """Files as the listener leaves them (content is irrelevant to retention)."""
    for uid in uids:
        spool.path_for(uid).write_bytes(b"\0" * FILE_BYTES)
    return list(uids)


def present(spool: Spool, uids: list[str]) -> list[str]:
    return [uid for uid in uids if spool.contains(uid)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spool(tmp_path: Path) -> SmallDisk:
    disk = SmallDisk(tmp_path / "spool", tmp_path / "quarantine")
    disk.capacity = 10**12  # plenty, unless a test says otherwise
    return disk


def make(spool: Spool, conn: redis.Redis, clock: Clock, **kwargs: float) -> Retention:
    options: dict[str, float] = {"hours": 1, "low_free_bytes": 0, **kwargs}
    return Retention(
        spool,
        conn,
        hours=options["hours"],
        low_free_bytes=int(options["low_free_bytes"]),
        clock=clock,
    )


def test_nothing_is_deleted_before_it_is_due_then_it_is(
    spool: SmallDisk, redis_conn: redis.Redis, clock: Clock
) -> None:
    retention = make(spool, redis_conn, clock)
    kept = spooled(spool, "1.2.3.9")  # never eligible: its results are not delivered
    uids = spooled(spool, "1.2.3.1", "1.2.3.2")
    retention.eligible(uids)
    assert retention.pending() == 2
    clock.advance(HOUR - 1)
    assert retention.clean() == 0
    assert present(spool, uids) == uids
    clock.advance(1)
    assert retention.clean() == 2
    assert present(spool, uids + kept) == kept
    assert retention.pending() == 0
    assert retention.clean() == 0


def test_eligible_again_keeps_the_first_due_time(
    spool: SmallDisk, redis_conn: redis.Redis, clock: Clock
) -> None:
    """A second delivery (another sink, a forced re-push) does not postpone the deletion."""
    retention = make(spool, redis_conn, clock)
    uids = spooled(spool, "1.2.3.1")
    retention.eligible(uids)
    clock.advance(HOUR / 2)
    retention.eligible(uids)
    clock.advance(HOUR / 2)
    assert retention.clean() == 1


def test_deleted_elsewhere_is_forgotten_without_error(
    spool: SmallDisk, redis_conn: redis.Redis, clock: Clock
) -> None:
    retention = make(spool, redis_conn, clock)
    uids = spooled(spool, "1.2.3.1", "1.2.3.2")
    retention.eligible(uids)
    spool.path_for("1.2.3.1").unlink()
    clock.advance(HOUR)
    assert retention.clean() == 1
    assert retention.pending() == 0


def test_zero_hours_keeps_everything(
    spool: SmallDisk, redis_conn: redis.Redis, clock: Clock
) -> None:
    retention = make(spool, redis_conn, clock, hours=0, low_free_bytes=10**15)
    uids = spooled(spool, "1.2.3.1", "1.2.3.2")
    assert not retention.enabled
    retention.eligible(uids)
    assert retention.pending() == 0
    clock.advance(1000 * HOUR)
    assert retention.clean() == 0  # even with the disk "short"
    assert present(spool, uids) == uids


def test_low_disk_deletes_oldest_eligible_first_before_due(
    spool: SmallDisk, redis_conn: redis.Redis, clock: Clock
) -> None:
    """More eligible files than one round takes (CHUNK): with the disk short, the older
    deliveries go first, whatever their due time, and the clean-up stops once there is room."""
    chunk = retention_module.CHUNK
    retention = make(spool, redis_conn, clock, low_free_bytes=chunk * FILE_BYTES)
    never = spooled(spool, "1.2.9.1")  # not delivered: never deleted, however short the disk
    older = spooled(spool, *(f"1.2.4.{n}" for n in range(chunk - 50)))
    retention.eligible(older)
    clock.advance(60)
    newer = spooled(spool, *(f"1.2.5.{n}" for n in range(150)))
    retention.eligible(newer)
    total = len(older) + len(newer) + len(never)
    spool.capacity = total * FILE_BYTES + FILE_BYTES  # 1 file's worth free: short
    clock.advance(60)  # nothing is due for an hour
    assert retention.clean() == chunk
    assert present(spool, older) == []
    left = present(spool, newer)
    assert len(left) == 100  # the round's other 50 came from the newer delivery
    assert present(spool, never) == never
    assert spool.free_bytes() >= chunk * FILE_BYTES
    assert retention.pending() == 100
    assert retention.clean() == 0  # enough room now, nothing due


def test_low_disk_with_nothing_eligible_deletes_nothing(
    spool: SmallDisk, redis_conn: redis.Redis, clock: Clock
) -> None:
    retention = make(spool, redis_conn, clock, low_free_bytes=10**15)
    uids = spooled(spool, "1.2.3.1")
    assert retention.clean() == 0
    assert present(spool, uids) == uids


def test_rearrived_instance_is_not_deleted(
    spool: SmallDisk, redis_conn: redis.Redis, clock: Clock
) -> None:
    """A delivered instance sent again (a new study version) leaves the eligible set with its
    arrival: neither the due clean-up nor a short disk deletes the file being re-read."""
    retention = make(spool, redis_conn, clock, low_free_bytes=10**15)
    studies = Studies(redis_conn, StudySettings(stable_seconds=5), clock=clock)
    uids = spooled(spool, "1.2.3.1", "1.2.3.2")
    retention.eligible(uids)
    clock.advance(HOUR / 2)
    studies.arrived([("1.2.3", "1.2.3.1")])
    clock.advance(HOUR)
    assert retention.clean() == 1
    assert present(spool, uids) == ["1.2.3.1"]
    assert retention.pending() == 0
