"""Pushes that will not succeed by waiting: kept with their reason until an operator acts.

A push that a sink refused for good (a 4xx, a DIMSE failure status) or that kept failing
transiently through every retry becomes a *dead letter*: one row per (sink, study, version),
named by its push job's id, shown newest first in /status and re-sent by
``pacs-embed requeue <id>`` (which takes the row out). Values are UIDs, a sink name, a version
and the sink's reason (statuses and counts, never a data set value): no PHI.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import redis

from pipeline import keys
from pipeline.keys import text
from pipeline.ledger import iso


@dataclass(frozen=True)
class DeadLetter:
    id: str  # the push job's id
    sink: str
    study_instance_uid: str
    version: int
    reason: str
    at: str  # ISO 8601

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class DeadLetters:
    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection

    def add(self, letter_id: str, sink: str, study: str, version: int, reason: str) -> None:
        now = time.time()
        row = {"sink": sink, "study_instance_uid": study, "version": version, "reason": reason}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.DEAD_LETTERS, letter_id, json.dumps({**row, "at": iso(now)}))
        pipe.zadd(keys.DEAD_LETTERS_RECENT, {letter_id: now})
        pipe.execute()

    def take(self, letter_id: str) -> DeadLetter | None:
        """Remove and return one dead letter (to re-send it); None if there is none."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hget(keys.DEAD_LETTERS, letter_id)
        pipe.hdel(keys.DEAD_LETTERS, letter_id)
        pipe.zrem(keys.DEAD_LETTERS_RECENT, letter_id)
        raw = pipe.execute()[0]
        return None if raw is None else DeadLetter(id=letter_id, **json.loads(raw))

    def recent(self, limit: int = 50) -> list[DeadLetter]:
        ids = [text(i) for i in self.redis.zrevrange(keys.DEAD_LETTERS_RECENT, 0, limit - 1)]
        rows = self.redis.hmget(keys.DEAD_LETTERS, ids) if ids else []
        return [
            DeadLetter(id=i, **json.loads(raw))
            for i, raw in zip(ids, rows, strict=True)
            if raw is not None
        ]

    def count(self) -> int:
        return int(self.redis.hlen(keys.DEAD_LETTERS))
