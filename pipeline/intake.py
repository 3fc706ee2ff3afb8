"""What the listener turned away, and why: counters and the most recent events, in Redis.

An operator whose PACS says "sent" must be able to see why nothing arrived, so every refused
C-STORE, rejected association, rejected presentation context and non-conformant UID is counted
here and shown by ``/status`` and ``/metrics``. Events carry AE titles, addresses, SOP Class UIDs,
statuses and reasons: never a value from a data set (reasons are written not to quote one).

Recording must never break the C-STORE path: a Redis outage is logged and the event dropped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import redis
import structlog

from pipeline import keys
from pipeline.keys import text
from pipeline.ledger import iso

log = structlog.get_logger(__name__)

#: Events kept in the recent list (keys.INTAKE_RECENT), newest first.
RECENT_MAX = 100


class Kind(StrEnum):
    """What happened at the door."""

    REFUSED = "refused"  # a C-STORE answered with a failure status
    ASSOCIATION_REJECTED = "association_rejected"
    CONTEXT_REJECTED = "context_rejected"  # a proposed presentation context was not accepted
    NONCONFORMANT_UID = "nonconformant_uid"  # accepted, but breaks the UI grammar


def printable(value: object, limit: int = 64) -> str:
    """A peer-supplied identifier (AE title, address, UID) made safe to log and show: printable
    ASCII only, at most ``limit`` characters."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text.strip())
    return cleaned[:limit] + ("..." if len(cleaned) > limit else "")


@dataclass(frozen=True)
class Event:
    kind: Kind
    reason: str
    calling_ae: str = ""
    address: str = ""
    sop_class_uid: str = ""
    status: str = ""  # "0xC000" for refusals
    at: float = field(default_factory=time.time)

    @property
    def counter(self) -> str:
        prefix = f"{self.status}: " if self.status else ""
        return f"{self.kind}|{prefix}{self.reason}"


class IntakeLog:
    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection

    def record(self, event: Event) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(keys.INTAKE_COUNTS, event.counter, 1)
                if event.kind != Kind.NONCONFORMANT_UID:  # counted, but too common to list
                    pipe.lpush(keys.INTAKE_RECENT, json.dumps(asdict(event)))
                    pipe.ltrim(keys.INTAKE_RECENT, 0, RECENT_MAX - 1)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("intake.unrecorded", kind=event.kind, error=type(exc).__name__)

    def summary(self, recent: int = 20) -> dict[str, Any]:
        """The ``input`` section of /status: counts by kind and reason, newest events first."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.INTAKE_COUNTS)
            pipe.lrange(keys.INTAKE_RECENT, 0, recent - 1)
            counts, events = pipe.execute()
        by_kind: dict[str, dict[str, int]] = {kind: {} for kind in Kind}
        for (kind, reason), count in _parse(counts).items():
            by_kind.setdefault(kind, {})[reason] = count
        return {
            "refused": by_kind.pop(Kind.REFUSED),
            "associations_rejected": by_kind.pop(Kind.ASSOCIATION_REJECTED),
            "contexts_rejected": by_kind.pop(Kind.CONTEXT_REJECTED),
            "nonconformant_uids": sum(by_kind.pop(Kind.NONCONFORMANT_UID).values()),
            "recent": [{**e, "at": iso(e["at"])} for e in map(json.loads, events)],
        }

    def totals(self) -> dict[tuple[str, str], int]:
        """(kind, reason) -> count, for the metrics."""
        return _parse(self.redis.hgetall(keys.INTAKE_COUNTS))


def _parse(counts: dict[Any, Any]) -> dict[tuple[str, str], int]:
    """The counts hash as (kind, reason) -> count."""
    out: dict[tuple[str, str], int] = {}
    for raw_key, count in counts.items():
        kind, _, reason = text(raw_key).partition("|")
        out[(kind, reason)] = int(count)
    return out
