"""Where every instance stands, in Redis: received -> converted -> queued -> embedded | failed.

The spool on the listener host is the truth about *what was received*; the ledger is the truth
about *how far each instance got*. Losing the ledger's last second (Redis AOF fsyncs every second)
only means redoing idempotent work, never losing an instance. Values are UIDs and reasons: no PHI.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

PREFIX = "pe"
RECEIVED = f"{PREFIX}:received"  # set of SOP UIDs acknowledged and picked up
CONVERTED = f"{PREFIX}:converted"  # set
EMBEDDED = f"{PREFIX}:embedded"  # set
SKIPPED = f"{PREFIX}:skipped"  # hash sop -> reason (no pixel data: nothing to embed)
FAILED = f"{PREFIX}:failed"  # hash sop -> json {stage, reason, at}


def instance_key(sop_uid: str) -> str:
    return f"{PREFIX}:inst:{sop_uid}"


@dataclass(frozen=True)
class Failure:
    sop_instance_uid: str
    stage: str
    reason: str
    at: float


class Ledger:
    """Instance states. Every method is one round trip (a pipeline), safe to repeat."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection

    def received(self, sop_uids: Iterable[str]) -> None:
        uids = list(sop_uids)
        if uids:
            self.redis.sadd(RECEIVED, *uids)

    def converted(self, sop_uid: str, fields: dict[str, str]) -> None:
        """Record conversion and the non-PHI header fields later stages report on."""
        mapping: dict[Any, Any] = {**fields, "state": "converted"}
        with self.redis.pipeline() as pipe:
            pipe.sadd(CONVERTED, sop_uid)
            pipe.hset(instance_key(sop_uid), mapping=mapping)
            pipe.execute()

    def queued(self, sop_uids: Iterable[str], job_id: str) -> None:
        with self.redis.pipeline() as pipe:
            for uid in sop_uids:
                pipe.hset(instance_key(uid), mapping={"state": "queued", "job": job_id})
            pipe.execute()

    def failed(self, sop_uid: str, stage: str, reason: str) -> None:
        record = json.dumps({"stage": stage, "reason": reason, "at": time.time()})
        with self.redis.pipeline() as pipe:
            pipe.hset(FAILED, sop_uid, record)
            pipe.hset(instance_key(sop_uid), mapping={"state": "failed"})
            pipe.execute()

    def skipped(self, sop_uid: str, reason: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hset(SKIPPED, sop_uid, reason)
            pipe.hset(instance_key(sop_uid), mapping={"state": "skipped"})
            pipe.execute()

    def mark_embedded(self, pipe: Any, sop_uids: Iterable[str]) -> None:
        """Add the 'embedded' transition to a caller's transaction, so it lands with the vectors."""
        uids = list(sop_uids)
        pipe.sadd(EMBEDDED, *uids)
        pipe.hdel(FAILED, *uids)
        for uid in uids:
            pipe.hset(instance_key(uid), "state", "embedded")

    def final(self, sop_uids: list[str]) -> list[bool]:
        """For each UID: has it reached a final state (embedded, failed or skipped)?"""
        if not sop_uids:
            return []
        with self.redis.pipeline() as pipe:
            for uid in sop_uids:
                pipe.sismember(EMBEDDED, uid)
                pipe.hexists(FAILED, uid)
                pipe.hexists(SKIPPED, uid)
            flags = pipe.execute()
        return [any(flags[i : i + 3]) for i in range(0, len(flags), 3)]

    def embedded(self, sop_uids: list[str]) -> list[bool]:
        if not sop_uids:
            return []
        return [bool(flag) for flag in self.redis.smismember(EMBEDDED, sop_uids)]

    def jobs_of(self, sop_uids: list[str]) -> list[str | None]:
        with self.redis.pipeline() as pipe:
            for uid in sop_uids:
                pipe.hget(instance_key(uid), "job")
            return [job.decode() if job else None for job in pipe.execute()]

    def counts(self) -> dict[str, int]:
        with self.redis.pipeline() as pipe:
            pipe.scard(RECEIVED)
            pipe.scard(CONVERTED)
            pipe.scard(EMBEDDED)
            pipe.hlen(FAILED)
            pipe.hlen(SKIPPED)
            received, converted, embedded, failed, skipped = pipe.execute()
        return {
            "received": received,
            "converted": converted,
            "embedded": embedded,
            "failed": failed,
            "skipped": skipped,
        }

    def failures(self, limit: int = 100) -> list[Failure]:
        """Up to ``limit`` failures with their reasons, for /status and operators."""
        out = []
        for uid, raw in self.redis.hscan_iter(FAILED, count=limit):
            record = json.loads(raw)
            out.append(Failure(uid.decode(), record["stage"], record["reason"], record["at"]))
            if len(out) >= limit:
                break
        return out
