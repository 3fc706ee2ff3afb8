"""Spool retention: the spooled copy of an instance goes once its results are delivered.

Nothing else ever deletes from the spool, so without this it fills the disk, start-up
reconciliation walks the whole history, and the listener ends up refusing everything under its
free-disk watermark. After a study version reached every configured sink (or completed, with no
sink configured), its instances become *eligible*: their files are deleted
``spool.retention_hours`` later, oldest first, and earlier — oldest eligible first, whatever
their time — while free disk is under ``spool.cleanup_free_disk_mb`` (mercure's cleaner does
both). ``retention_hours = 0`` keeps everything. Each listener node (a state dir: a host) keeps
its own set, and its push service deletes only from its own spool. Quarantined files are not
the spool's: they stay until requeued or purged (``pacs-embed purge``).

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
from pipeline.keys import DEFAULT_NODE, text
from pipeline.ledger import Ledger

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
        node: str = DEFAULT_NODE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.redis = connection
        self.node = node
        self.key = keys.retention_key(node)
        self.keep_seconds = hours * 3600
        self.low_free_bytes = low_free_bytes
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return self.keep_seconds > 0

    def eligible(self, sop_uids: Iterable[str]) -> None:
        """These instances' results are delivered: delete their files after the retention, each
        from the spool of the node that holds it (the ledger says which; this node if unsaid)."""
        if not self.enabled:
            return
        uids = list(sop_uids)
        due = self.clock() + self.keep_seconds
        by_node: dict[str, dict[str, float]] = {}
        for sop, node in zip(uids, Ledger(self.redis).nodes(uids), strict=True):
            by_node.setdefault(node or self.node, {})[sop] = due
        for node, mapping in by_node.items():
            self.redis.zadd(keys.retention_key(node), mapping, nx=True)

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
        return [text(s) for s in self.redis.zrangebyscore(self.key, "-inf", top, 0, CHUNK)]

    def _delete(self, sop_uids: list[str]) -> int:
        deleted = 0
        for sop in sop_uids:
            try:
                self.spool.path_for(sop).unlink()
                deleted += 1
            except FileNotFoundError:
                pass
        self.redis.zrem(self.key, *sop_uids)
        return deleted

    def pending(self) -> int:
        """Files eligible, not yet deleted."""
        return int(self.redis.zcard(self.key))
