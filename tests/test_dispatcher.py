"""The dispatcher against a real Redis and a real process pool: batching, skips, quarantine, and
no instance lost while Redis is away."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from dicom_listener.dispatcher import Dispatcher, DispatchLimits
from dicom_listener.spool import Spool
from pipeline.convert import ConvertOptions
from pipeline.jobs import EmbedBatch
from pipeline.ledger import Ledger
from tests import factory


class FlakyLedger(Ledger):
    """A ledger whose Redis 'goes away' for the first ``failures`` conversions."""

    def __init__(self, connection: redis.Redis, failures: int) -> None:
        super().__init__(connection)
        self.failures = failures

    def converted(self, sop_uid: str, fields: dict[str, str]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise redis.ConnectionError("Redis went away")
        super().converted(sop_uid, fields)


def run_dispatcher(tmp_path: Path, ledger: Ledger, files: list[bytes]) -> list[EmbedBatch]:
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    batches: list[EmbedBatch] = []
    dispatcher = Dispatcher(
        spool=spool,
        ledger=ledger,
        enqueue=lambda batch: batches.append(batch) or f"job{len(batches)}",
        queue_depth=lambda: 0,
        options=ConvertOptions(size=64),
        limits=DispatchLimits(batch_size=4, linger_seconds=0.1, in_flight=2),
        processes=1,
    )
    dispatcher.start()
    try:
        for i, data in enumerate(files):
            dispatcher.submit(spool.write(f"1.2.3.{i + 1}", data))
        assert dispatcher.wait_idle(60), "dispatcher did not drain"
    finally:
        dispatcher.stop()
    return batches


def encoded_series(n: int) -> list[bytes]:
    import io

    out = []
    for i, ds in enumerate(factory.ct_series(n, rows=32, columns=32, identical=None)):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.{i + 1}"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


@pytest.mark.e2e
def test_series_batched_and_bad_file_quarantined(tmp_path: Path, redis_conn: redis.Redis) -> None:
    """6 slices of one series go out as batches of 4 and 2; a garbage file is quarantined."""
    files = [*encoded_series(6), b"DICM garbage"]
    batches = run_dispatcher(tmp_path, Ledger(redis_conn), files)
    assert sorted(len(b.items) for b in batches) == [2, 4]
    counts = Ledger(redis_conn).counts()
    assert (counts["received"], counts["converted"], counts["failed"]) == (7, 6, 1)
    assert (tmp_path / "quarantine" / "1.2.3.7.json").exists()


@pytest.mark.e2e
def test_redis_outage_loses_nothing(tmp_path: Path, redis_conn: redis.Redis) -> None:
    """Conversions whose ledger write fails are converted again, not dropped."""
    batches = run_dispatcher(tmp_path, FlakyLedger(redis_conn, failures=2), encoded_series(5))
    sent = sorted(item.sop_instance_uid for batch in batches for item in batch.items)
    assert sent == [f"1.2.3.{i}" for i in range(1, 6)]
