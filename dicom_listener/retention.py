"""Spool retention: the spooled copy of an instance goes once its results are delivered.

Nothing else ever deletes from the spool, so without this it fills the disk, start-up
reconciliation walks the whole history, and the listener ends up refusing everything under its
free-disk watermark. After a study version reached every configured sink (or completed, with no
sink configured), its instances become *eligible*: their files are deleted
``spool.retention_hours`` later, oldest first, and earlier — oldest eligible first, whatever
their time — while free disk is under ``spool.cleanup_free_disk_mb`` (mercure's cleaner does
both). ``retention_hours = 0`` keeps everything. Quarantined files are not the spool's: they stay
until requeued or purged (``pacs-embed purge``).

An instance that arrives again (a new version of its study) leaves the eligible set in the same
Redis script that records its arrival (pipeline/studies.py), so a file being re-read for a new
version is never deleted under it. Eligibility lives in Redis (``pe:retention``): a restart
forgets nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import redis
import structlog

from dicom_listener.spool import Spool
from pipeline import keys
from pipeline.keys import text

log = structlog.get_logger(__name__)

#: Files deleted per round trip.
CHUNK = 500


class Retention:
    def __init__(
        self,
        spool: Spool,
        connection: redis.Redis,
        *,
        hours: float,
        low_free_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.redis = connection
        self.keep_seconds = hours * 3600
        self.low_free_bytes = low_free_bytes
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return self.keep_seconds > 0

    def eligible(self, sop_uids: Iterable[str]) -> None:
        """These instances' results are delivered: delete their files after the retention."""
        if not self.enabled:
            return
        due = self.clock() + self.keep_seconds
        mapping = {sop: due for sop in sop_uids}
        if mapping:
            self.redis.zadd(keys.RETENTION, mapping, nx=True)

    def clean(self) -> int:
        """Delete what is due, then, while the disk is short, the oldest eligible. Returns the
        number of files deleted."""
        if not self.enabled:
            return 0
        deleted = 0
        while due := self._take(max_score=self.clock()):
            deleted += self._delete(due)
        while self.spool.free_bytes() < self.low_free_bytes and (early := self._take()):
            deleted += self._delete(early)
            log.warning(
                "retention.low_disk", deleted=len(early), free_bytes=self.spool.free_bytes()
            )
        if deleted:
            log.info("retention.deleted", files=deleted)
        return deleted

    def _take(self, max_score: float | None = None) -> list[str]:
        top = "+inf" if max_score is None else max_score
        return [text(s) for s in self.redis.zrangebyscore(keys.RETENTION, "-inf", top, 0, CHUNK)]

    def _delete(self, sop_uids: list[str]) -> int:
        deleted = 0
        for sop in sop_uids:
            try:
                self.spool.path_for(sop).unlink()
                deleted += 1
            except FileNotFoundError:
                pass
        self.redis.zrem(keys.RETENTION, *sop_uids)
        return deleted

    def pending(self) -> int:
        """Files eligible, not yet deleted."""
        return int(self.redis.zcard(keys.RETENTION))
