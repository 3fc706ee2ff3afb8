"""Where every instance stands, in Redis: one current state each, plus cumulative counters.

States are exclusive, so ``/status`` adds up: every received instance is in exactly one of

    spooled -> converting -> queued -> embedded
                          \\-> skipped     (not to be embedded: the reason says why)
                          \\-> failed      (quarantined: the reason says why)

``queued`` covers "converted and on its way": waiting for the rest of its batch, on the embed
queue, or being embedded. A resend of a failed (quarantined) instance starts again at
``spooled``, so a corrected resend clears the stale failure.

The spool on the listener host is the truth about *what was received*; the ledger is the truth
about *how far each instance got*. The private Redis of `pacs-embed run` fsyncs its AOF before
every answer; a Redis run with ``appendfsync everysec`` may lose its last second in a machine
crash, which only means redoing idempotent work, never losing an instance. Values are UIDs,
the few non-PHI header fields the workers need, and reasons: no PHI. The keys are listed in
pipeline/keys.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis

from pipeline import keys
from pipeline.keys import text


class State(StrEnum):
    """An instance's current state; exactly one at a time."""

    SPOOLED = "spooled"
    CONVERTING = "converting"
    QUEUED = "queued"
    EMBEDDED = "embedded"
    SKIPPED = "skipped"
    FAILED = "failed"


FINAL_STATES = (State.EMBEDDED, State.SKIPPED, State.FAILED)


class Stage(StrEnum):
    """Where a failure happened."""

    CONVERT = "convert"
    EMBED = "embed"


#: The Redis key holding each state's members; SKIPPED and FAILED are hashes (with a reason).
_STATE_KEYS: Mapping[State, str] = {
    State.SPOOLED: keys.SPOOLED,
    State.CONVERTING: keys.CONVERTING,
    State.QUEUED: keys.QUEUED,
    State.EMBEDDED: keys.EMBEDDED,
    State.SKIPPED: keys.SKIPPED,
    State.FAILED: keys.FAILED,
}
_HASH_STATES = (State.SKIPPED, State.FAILED)
_RECENT = {State.SKIPPED: keys.SKIPPED_RECENT, State.FAILED: keys.FAILED_RECENT}


def iso(at: float) -> str:
    """A Unix time as ISO 8601 UTC, as operators read it."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Failure:
    sop_instance_uid: str
    stage: str
    reason: str
    detail: str
    at: str  # ISO 8601


@dataclass(frozen=True)
class Skip:
    sop_instance_uid: str
    reason: str
    at: str  # ISO 8601


def _enter(pipe: Any, uids: list[str], state: State, value: str | None = None) -> None:
    """Queue the commands that move ``uids`` into ``state`` (out of every other one). Every
    transition also (re)adds them to ``received``, so an instance whose first write a Redis
    crash lost is counted again by the next."""
    pipe.sadd(keys.RECEIVED, *uids)
    for other, key in _STATE_KEYS.items():
        if other == state:
            continue
        if other in _HASH_STATES:
            pipe.hdel(key, *uids)
            pipe.zrem(_RECENT[other], *uids)
        else:
            pipe.srem(key, *uids)
    if state in _HASH_STATES:
        pipe.hset(_STATE_KEYS[state], mapping=dict.fromkeys(uids, value or ""))
        pipe.zadd(_RECENT[state], dict.fromkeys(uids, time.time()))
    else:
        pipe.sadd(_STATE_KEYS[state], *uids)


#: Move instances along the way (to converting, queued) unless they are embedded or skipped
#: already: a conversion redone after a crash (reconciliation, the sweeper) must not take a
#: finished instance back, or its second completion would count it twice. A correction or a
#: resend of a failed instance goes back explicitly, through ``spooled``.
#: KEYS: received, spooled, converting, queued, embedded, skipped, failed, failed:recent, target.
_ADVANCE = """
local moved = 0
for _, uid in ipairs(ARGV) do
  if redis.call('SISMEMBER', KEYS[5], uid) == 0 and redis.call('HEXISTS', KEYS[6], uid) == 0 then
    redis.call('SADD', KEYS[1], uid)
    redis.call('SREM', KEYS[2], uid)
    redis.call('SREM', KEYS[3], uid)
    redis.call('SREM', KEYS[4], uid)
    redis.call('HDEL', KEYS[7], uid)
    redis.call('ZREM', KEYS[8], uid)
    redis.call('SADD', KEYS[9], uid)
    moved = moved + 1
  end
end
return moved
"""


class Ledger:
    """Instance states. Every method is one round trip (a pipeline), safe to repeat."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection
        self._advance_script = connection.register_script(_ADVANCE)

    def _advance(self, pipe: Any, uids: list[str], state: State) -> None:
        keys_ = [
            keys.RECEIVED,
            keys.SPOOLED,
            keys.CONVERTING,
            keys.QUEUED,
            keys.EMBEDDED,
            keys.SKIPPED,
            keys.FAILED,
            keys.FAILED_RECENT,
            _STATE_KEYS[state],
        ]
        self._advance_script(keys=keys_, args=uids, client=pipe)

    def spooled(
        self,
        sop_uids: Iterable[str],
        digests: Mapping[str, str] | None = None,
        node: str | None = None,
    ) -> None:
        """Acknowledged and waiting for conversion (also: a resend of a failed instance, or a
        correction); ``digests``: each instance's spooled bytes' digest, to know a resend;
        ``node``: the listener node whose spool holds them (spool retention)."""
        uids = list(sop_uids)
        if uids:
            with self.redis.pipeline() as pipe:
                _enter(pipe, uids, State.SPOOLED)
                for uid, digest in (digests or {}).items():
                    pipe.hset(keys.instance_key(uid), "digest", digest)
                if node is not None:
                    for uid in uids:
                        pipe.hset(keys.instance_key(uid), "node", node)
                pipe.execute()

    def nodes(self, sop_uids: Sequence[str]) -> list[str | None]:
        """The listener node whose spool holds each instance (None: not recorded)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for uid in sop_uids:
                pipe.hget(keys.instance_key(uid), "node")
            return [text(n) if n is not None else None for n in pipe.execute()]

    def states(self, sop_uids: Sequence[str]) -> list[tuple[State | None, str | None]]:
        """Each instance's current state (None: unknown) and, for a skipped or failed one, what
        its state holds: the skip's reason, the failure's JSON record."""
        with self.redis.pipeline(transaction=False) as pipe:
            for uid in sop_uids:
                for state, key in _STATE_KEYS.items():
                    pipe.hget(key, uid) if state in _HASH_STATES else pipe.sismember(key, uid)
            flags = pipe.execute()
        out: list[tuple[State | None, str | None]] = []
        width = len(_STATE_KEYS)
        for n in range(len(sop_uids)):
            row = flags[n * width : (n + 1) * width]
            held = [(s, v) for s, v in zip(_STATE_KEYS, row, strict=True) if v]
            if not held:
                out.append((None, None))
                continue
            state, value = held[0]  # exclusive states: at most one
            out.append((state, text(value) if state in _HASH_STATES else None))
        return out

    def digests(self, sop_uids: Sequence[str]) -> list[str | None]:
        """The digest of each instance's bytes as last spooled (None: never, or not recorded)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for uid in sop_uids:
                pipe.hget(keys.instance_key(uid), "digest")
            return [text(d) if d is not None else None for d in pipe.execute()]

    def settled(self, sop_uids: Sequence[str]) -> list[bool]:
        """For each instance: embedded or skipped, i.e. final and not to be tried again."""
        if not sop_uids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.smismember(keys.EMBEDDED, list(sop_uids))
            pipe.hmget(keys.SKIPPED, list(sop_uids))
            embedded, skipped = pipe.execute()
        return [bool(e) or s is not None for e, s in zip(embedded, skipped, strict=True)]

    def converting(self, sop_uids: Iterable[str]) -> None:
        uids = list(sop_uids)
        if uids:
            with self.redis.pipeline() as pipe:
                self._advance(pipe, uids, State.CONVERTING)
                pipe.execute()

    def converted(
        self, sop_uid: str, fields: Mapping[str, str], frames: Sequence[int] = ()
    ) -> None:
        """Record conversion: the non-PHI header fields later stages report on, and the frames
        selected for embedding (the instance is embedded once all of them are stored)."""
        self.converted_many([(sop_uid, fields, frames)])

    def converted_many(
        self, conversions: Sequence[tuple[str, Mapping[str, str], Sequence[int]]]
    ) -> None:
        """:meth:`converted` for several instances, in one transaction."""
        if not conversions:
            return
        with self.redis.pipeline() as pipe:
            self._advance(pipe, [uid for uid, _, _ in conversions], State.QUEUED)
            for uid, fields, frames in conversions:
                mapping = dict(fields)
                if frames:
                    mapping["frames"] = ",".join(map(str, frames))
                if mapping:
                    pipe.hset(keys.instance_key(uid), mapping=mapping)  # type: ignore[arg-type]
            pipe.hincrby(keys.COUNTERS, "converted", len(conversions))
            pipe.execute()

    def selected_frames(self, sop_uids: Sequence[str]) -> list[tuple[int, ...] | None]:
        """For each instance, the frames its conversion selected (None: not recorded, e.g. by a
        listener older than per-frame records)."""
        if not sop_uids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for uid in sop_uids:
                pipe.hget(keys.instance_key(uid), "frames")
            raws = pipe.execute()
        return [
            tuple(int(f) for f in text(raw).split(",") if f) if raw is not None else None
            for raw in raws
        ]

    def queued(self, sop_uids: Iterable[str], job_id: str) -> None:
        """The embed job that carries these instances."""
        with self.redis.pipeline() as pipe:
            for uid in sop_uids:
                pipe.hset(keys.instance_key(uid), "job", job_id)
            pipe.execute()

    def failed(self, sop_uid: str, stage: Stage, reason: str, detail: str = "") -> None:
        record = json.dumps({"stage": stage, "reason": reason, "detail": detail, "at": time.time()})
        with self.redis.pipeline() as pipe:
            _enter(pipe, [sop_uid], State.FAILED, record)
            pipe.hincrby(keys.COUNTERS, f"failed_{stage}", 1)
            pipe.execute()

    def skipped(self, sop_uid: str, reason: str) -> None:
        with self.redis.pipeline() as pipe:
            _enter(pipe, [sop_uid], State.SKIPPED, reason)
            pipe.hincrby(keys.COUNTERS, "skipped", 1)
            pipe.execute()

    def mark_embedded(self, pipe: Any, sop_uids: Iterable[str]) -> None:
        """Add the 'embedded' transition to a caller's transaction, so it lands with the vectors."""
        uids = list(sop_uids)
        _enter(pipe, uids, State.EMBEDDED)
        pipe.hincrby(keys.COUNTERS, "embedded", len(uids))

    def count(self, event: str, n: int = 1) -> None:
        """Bump a cumulative counter (e.g. ``resends``)."""
        self.redis.hincrby(keys.COUNTERS, event, n)

    def final(self, sop_uids: list[str]) -> list[bool]:
        """For each UID: has it reached a final state (embedded, failed or skipped)?"""
        if not sop_uids:
            return []
        with self.redis.pipeline() as pipe:
            for uid in sop_uids:
                pipe.sismember(keys.EMBEDDED, uid)
                pipe.hexists(keys.FAILED, uid)
                pipe.hexists(keys.SKIPPED, uid)
            flags = pipe.execute()
        return [any(flags[i : i + 3]) for i in range(0, len(flags), 3)]

    def embedded(self, sop_uids: list[str]) -> list[bool]:
        if not sop_uids:
            return []
        return [bool(flag) for flag in self.redis.smismember(keys.EMBEDDED, sop_uids)]

    def jobs_of(self, sop_uids: list[str]) -> list[str | None]:
        with self.redis.pipeline() as pipe:
            for uid in sop_uids:
                pipe.hget(keys.instance_key(uid), "job")
            return [job.decode() if job else None for job in pipe.execute()]

    def counts(self) -> dict[str, int]:
        """Instances by current state; ``received`` is their sum."""
        with self.redis.pipeline() as pipe:
            for state in State:
                key = _STATE_KEYS[state]
                pipe.hlen(key) if state in _HASH_STATES else pipe.scard(key)
            sizes = pipe.execute()
        by_state = {str(state): int(size) for state, size in zip(State, sizes, strict=True)}
        return {"received": sum(by_state.values()), **by_state}

    def counters(self) -> dict[str, int]:
        """Cumulative event counts since the ledger began (``received`` = distinct instances)."""
        with self.redis.pipeline() as pipe:
            pipe.scard(keys.RECEIVED)
            pipe.hgetall(keys.COUNTERS)
            received, raw = pipe.execute()
        counts = {text(k): int(v) for k, v in raw.items()}
        return {"received": int(received), **dict(sorted(counts.items()))}

    def failures(self, limit: int = 100, offset: int = 0) -> list[Failure]:
        """The most recent failures first, with their reasons, for /status and operators."""
        uids = [
            text(u) for u in self.redis.zrevrange(keys.FAILED_RECENT, offset, offset + limit - 1)
        ]
        if not uids:
            return []
        out = []
        for uid, raw in zip(uids, self.redis.hmget(keys.FAILED, uids), strict=True):
            if raw is None:
                continue  # left the failed state between the two reads
            record = json.loads(raw)
            out.append(
                Failure(
                    uid,
                    record["stage"],
                    record["reason"],
                    record.get("detail", ""),
                    iso(record["at"]),
                )
            )
        return out

    def skips(self, limit: int = 20) -> list[Skip]:
        """The most recent skips first, with their reasons."""
        pairs: list[tuple[bytes, float]] = self.redis.zrevrange(  # type: ignore[assignment]
            keys.SKIPPED_RECENT, 0, limit - 1, withscores=True
        )
        if not pairs:
            return []
        uids = [text(uid) for uid, _ in pairs]
        reasons = self.redis.hmget(keys.SKIPPED, uids)
        return [
            Skip(uid, text(reason), iso(at))
            for uid, (_, at), reason in zip(uids, pairs, reasons, strict=True)
            if reason is not None
        ]
