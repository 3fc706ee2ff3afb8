"""The dispatcher against a real Redis and a real process pool: batching, skips, quarantine, and
no instance lost while Redis is away."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
import redis
from rq import Queue

from dicom_listener.dispatcher import Dispatcher, DispatchLimits
from dicom_listener.spool import Spool
from pipeline.convert import ConvertOptions
from pipeline.jobs import EmbedBatch, enqueue_batch
from pipeline.ledger import Ledger, State
from tests import factory


class FlakyLedger(Ledger):
    """A ledger whose Redis 'goes away' for the first ``failures`` conversions."""

    def __init__(self, connection: redis.Redis, failures: int) -> None:
        super().__init__(connection)
        self.failures = failures

    def converted_many(
        self, conversions: Sequence[tuple[str, Mapping[str, str], Sequence[int]]]
    ) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise redis.ConnectionError("Redis went away")
        super().converted_many(conversions)


def run_dispatcher(
    tmp_path: Path,
    ledger: Ledger,
    files: list[bytes],
    enqueue: Callable[[EmbedBatch], str] | None = None,
    *,
    options: ConvertOptions | None = None,
    limits: DispatchLimits | None = None,
) -> list[EmbedBatch]:
    """Dispatch ``files`` (spooled as SOP UIDs 1.2.3.1, 1.2.3.2, ...) until idle; the batches."""
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    batches: list[EmbedBatch] = []

    def collect(batch: EmbedBatch) -> str:
        job = enqueue(batch) if enqueue else f"job{len(batches) + 1}"
        batches.append(batch)
        return job

    dispatcher = Dispatcher(
        spool=spool,
        ledger=ledger,
        enqueue=collect,
        queue_depth=lambda: 0,
        options=options or ConvertOptions(size=64),
        limits=limits or DispatchLimits(batch_size=4, linger_seconds=0.1, in_flight=2),
        processes=1,
    )
    dispatcher.start()
    try:
        for i, data in enumerate(files):
            dispatcher.submit(spool.write(f"1.2.3.{i + 1}", data))
        assert dispatcher.wait_idle(60), "dispatcher did not drain"
        assert dispatcher.health()["ok"]
    finally:
        dispatcher.stop()
    return batches


def encoded_series(n: int, series_uid: str | None = None, first: int = 1) -> list[bytes]:
    """``n`` CT slices with SOP UIDs 1.2.3.<first>, ...; ``series_uid`` "" drops the element."""
    import io

    out = []
    for i, ds in enumerate(factory.ct_series(n, rows=32, columns=32, identical=None)):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.{i + first}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the bad UIDs we want
            if series_uid == "":
                del ds.SeriesInstanceUID
            elif series_uid is not None:
                ds.SeriesInstanceUID = series_uid
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def test_series_batched_and_bad_file_quarantined(tmp_path: Path, redis_conn: redis.Redis) -> None:
    """6 slices of one series go out as batches of 4 and 2; a garbage file is quarantined."""
    files = [*encoded_series(6), b"DICM garbage"]
    batches = run_dispatcher(tmp_path, Ledger(redis_conn), files)
    assert sorted(len(b.items) for b in batches) == [2, 4]
    counts = Ledger(redis_conn).counts()
    assert (counts["received"], counts["queued"], counts["failed"]) == (7, 6, 1)
    assert (tmp_path / "quarantine" / "1.2.3.7.json").exists()


def test_redis_outage_loses_nothing(tmp_path: Path, redis_conn: redis.Redis) -> None:
    """Conversions whose ledger write fails are converted again, not dropped."""
    batches = run_dispatcher(tmp_path, FlakyLedger(redis_conn, failures=2), encoded_series(5))
    sent = sorted(item.image.sop_instance_uid for batch in batches for item in batch.items)
    assert sent == [f"1.2.3.{i}" for i in range(1, 6)]


@pytest.mark.parametrize("series_uid", ["1.2.3/../4", "1.2.3\\4.5.6", ""])
def test_an_unusable_series_uid_is_quarantined_and_never_wedges(
    tmp_path: Path, redis_conn: redis.Redis, series_uid: str
) -> None:
    """The issue-8 wedge: a Series UID rq cannot take, or none, is quarantined with its reason;
    a series arriving after it is still enqueued on a real rq queue."""
    bad = encoded_series(1, series_uid=series_uid)
    good = encoded_series(2, series_uid="1.2.840.99.7", first=2)
    queue = Queue("embed-test", connection=redis_conn)
    batches = run_dispatcher(
        tmp_path,
        Ledger(redis_conn),
        [*bad, *good],
        enqueue=lambda batch: enqueue_batch(queue, batch, timeout=60, retries=0),
    )
    sent = sorted(item.image.sop_instance_uid for b in batches for item in b.items)
    assert sent == ["1.2.3.2", "1.2.3.3"]  # in the order their conversions finished
    assert queue.count == 1
    ledger = Ledger(redis_conn)
    [failure] = ledger.failures()
    assert failure.sop_instance_uid == "1.2.3.1" and "Series Instance UID" in failure.reason
    assert ledger.counts()[State.QUEUED] == 2


def test_a_batch_the_queue_refuses_is_quarantined_alone(
    tmp_path: Path, redis_conn: redis.Redis
) -> None:
    """Anything but a Redis outage from enqueue quarantines that batch only; the loop goes on."""

    def enqueue(batch: EmbedBatch) -> str:
        if batch.series_instance_uid == "1.2.840.99.1":
            raise ValueError("job id refused")
        return "job"

    files = [*encoded_series(1, "1.2.840.99.1"), *encoded_series(1, "1.2.840.99.2", first=2)]
    batches = run_dispatcher(tmp_path, Ledger(redis_conn), files, enqueue=enqueue)
    assert [b.series_instance_uid for b in batches] == ["1.2.840.99.2"]
    [failure] = Ledger(redis_conn).failures()
    assert (failure.sop_instance_uid, failure.reason) == ("1.2.3.1", "cannot enqueue")
    assert "job id refused" in failure.detail
