"""Study versions: when a study is complete, and which version of its results is due where.

A study is *complete* when no instance of it has arrived for ``stable_seconds`` and every
instance it received is final (embedded, skipped or failed) — or, whatever is still pending,
``max_wait_seconds`` after its version opened. Each completion is a *version*: instances that
arrive after a version completed (a late series, a resend, a correction) open the next one, whose
results supersede the last. (docs/architecture.md §11.)

Everything lives in Redis and every transition is one Lua script, so a restart of any process,
or two processes checking at once, neither loses nor repeats a completion:

* :meth:`Studies.arrived` (the listener's dispatcher, with the instance's spooling) adds the
  instances to the study's members, opens a new version if the last one was complete, and sets
  the study's due time;
* :meth:`Studies.complete_due` (the push service, every second) looks at studies whose due time
  passed: complete ones get their version recorded and are put in the *outbox*; others get a new
  due time;
* the outbox (study -> latest completed version) is drained by whoever turns versions into push
  jobs (``pipeline.push``), which removes an entry only if no newer version replaced it.

Pushes are recorded per sink (``pushed:<sink>`` = the last version delivered), so a redone push
job knows it is done. Values are UIDs, counts and times: no PHI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from pipeline import keys
from pipeline.keys import DEFAULT_NODE, text
from pipeline.ledger import Ledger
from pipeline.sections import StudySettings


class StudyState(StrEnum):
    OPEN = "open"  # receiving, or waiting for its instances to be final
    COMPLETE = "complete"  # the current version is complete (pushes may be pending)


@dataclass(frozen=True)
class Completed:
    """A study version that just completed; ``pending`` instances were not final (max wait)."""

    study_uid: str
    version: int
    pending: int


@dataclass(frozen=True)
class StudyProgress:
    """One study as /studies shows it."""

    study_uid: str
    version: int
    state: str
    received: int
    final: int
    completed_version: int
    opened: float  # unix seconds
    last_arrival: float
    completed: float | None
    pushed: Mapping[str, int]  # sink -> last version delivered

    def to_json(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_uid,
            "version": self.version,
            "state": self.state,
            "received": self.received,
            "final": self.final,
            "complete": self.completed_version == self.version,
            "completed_version": self.completed_version,
            "opened": self.opened,
            "last_arrival": self.last_arrival,
            "completed": self.completed,
            "pushed": dict(self.pushed),
        }


#: KEYS: study hash, members, due zset, recent zset, the node's retention zset. ARGV: now ms,
#: stable ms, max wait ms, study UID, node, SOP UIDs... The study's pushes go to the node of its
#: latest arrival (it has that file at least). Returns the study's current version.
_ARRIVED = """
for i = 6, #ARGV do
  redis.call('SADD', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[5], ARGV[i])
end
redis.call('HSET', KEYS[1], 'node', ARGV[5])
local now = tonumber(ARGV[1])
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then
  redis.call('HINCRBY', KEYS[1], 'version', 1)
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_ms', now)
end
redis.call('HSET', KEYS[1], 'last_ms', now)
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_ms'))
local due = math.min(now + tonumber(ARGV[2]), opened + tonumber(ARGV[3]))
redis.call('ZADD', KEYS[3], due, ARGV[4])
redis.call('ZADD', KEYS[4], now, ARGV[4])
return tonumber(redis.call('HGET', KEYS[1], 'version'))
"""

#: KEYS: study hash, members, embedded set, skipped hash, failed hash, due zset, outbox zset.
#: ARGV: now ms, stable ms, max wait ms, study UID, recheck ms.
#: Returns {version, pending} when it completed the version, else {0, pending}.
_COMPLETE = """
local now = tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'state', 'version', 'opened_ms', 'last_ms')
if h[1] ~= 'open' then
  redis.call('ZREM', KEYS[6], ARGV[4])
  return {0, 0}
end
local opened, last = tonumber(h[3]), tonumber(h[4])
local cap = opened + tonumber(ARGV[3])
if now < last + tonumber(ARGV[2]) and now < cap then
  redis.call('ZADD', KEYS[6], math.min(last + tonumber(ARGV[2]), cap), ARGV[4])
  return {0, 0}
end
local pending = 0
for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('SISMEMBER', KEYS[3], m) == 0 and redis.call('HEXISTS', KEYS[4], m) == 0
     and redis.call('HEXISTS', KEYS[5], m) == 0 then
    pending = pending + 1
  end
end
if pending > 0 and now < cap then
  redis.call('ZADD', KEYS[6], math.min(now + tonumber(ARGV[5]), cap), ARGV[4])
  return {0, pending}
end
redis.call('HSET', KEYS[1], 'state', 'complete', 'completed_version', h[2], 'completed_ms', now)
redis.call('ZREM', KEYS[6], ARGV[4])
redis.call('ZADD', KEYS[7], tonumber(h[2]), ARGV[4])
return {tonumber(h[2]), pending}
"""

#: KEYS: outbox. ARGV: study, version. Removes the entry if it still holds that version.
_TAKE = """
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or -1) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

#: KEYS: study hash. ARGV: sink, version. Records a delivery unless a newer one is recorded,
#: and which version it superseded there (``prev:<sink>:<version>``, for a forced re-push).
_PUSHED = """
local field = 'pushed:' .. ARGV[1]
local before = tonumber(redis.call('HGET', KEYS[1], field) or 0)
if before < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], field, ARGV[2], 'prev:' .. ARGV[1] .. ':' .. ARGV[2], before)
  return 1
end
return 0
"""

#: The settings' defaults, for readers that never complete a version.
DEFAULT_TIMING = StudySettings()

#: How often a study whose instances are not all final is looked at again.
RECHECK_MS = 250


class Studies:
    """Study versions in Redis (see the module docstring)."""

    def __init__(
        self,
        connection: redis.Redis,
        timing: StudySettings = DEFAULT_TIMING,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``timing``: when versions complete (readers such as /status need not pass it)."""
        self.redis = connection
        self.stable_ms = round(timing.stable_seconds * 1000)
        self.max_wait_ms = round(timing.max_wait_seconds * 1000)
        self.clock = clock
        self._arrived = connection.register_script(_ARRIVED)
        self._complete = connection.register_script(_COMPLETE)
        self._take = connection.register_script(_TAKE)
        self._pushed = connection.register_script(_PUSHED)

    def _now_ms(self) -> int:
        return round(self.clock() * 1000)

    def arrived(self, members: Iterable[tuple[str, str]], node: str = DEFAULT_NODE) -> None:
        """Instances ``(study UID, SOP UID)`` were spooled on listener ``node``: count them in,
        (re)arm the timer."""
        by_study: dict[str, list[str]] = {}
        for study, sop in members:
            by_study.setdefault(study, []).append(sop)
        if not by_study:
            return
        now = self._now_ms()
        pipe = self.redis.pipeline(transaction=False)
        for study, sops in by_study.items():
            self._arrived(
                keys=self._arrival_keys(study, node),
                args=[now, self.stable_ms, self.max_wait_ms, study, node, *sops],
                client=pipe,
            )
        pipe.execute()

    def _arrival_keys(self, study: str, node: str) -> list[str]:
        return [
            keys.study_state_key(study),
            keys.study_members_key(study),
            keys.STUDIES_DUE,
            keys.STUDIES_RECENT,
            keys.retention_key(node),
        ]

    def node_of(self, study: str) -> str:
        """The listener node whose push service pushes ``study`` (its latest arrival's)."""
        node = self.redis.hget(keys.study_state_key(study), "node")
        return text(node) if node is not None else DEFAULT_NODE

    def complete_due(self, limit: int = 100) -> list[Completed]:
        """Complete the versions that are due and ready; re-arm the others."""
        now = self._now_ms()
        due = [text(s) for s in self.redis.zrangebyscore(keys.STUDIES_DUE, "-inf", now, 0, limit)]
        done = []
        for study in due:
            version, pending = self._complete(
                keys=[
                    keys.study_state_key(study),
                    keys.study_members_key(study),
                    keys.EMBEDDED,
                    keys.SKIPPED,
                    keys.FAILED,
                    keys.STUDIES_DUE,
                    keys.PUSH_OUTBOX,
                ],
                args=[now, self.stable_ms, self.max_wait_ms, study, RECHECK_MS],
            )
            if int(version):
                done.append(Completed(study, int(version), int(pending)))
        return done

    def outbox(self, limit: int = 100) -> list[tuple[str, int]]:
        """Completed versions not yet turned into push jobs: (study UID, version)."""
        rows = self.redis.zrange(keys.PUSH_OUTBOX, 0, limit - 1, withscores=True)
        return [(text(row[0]), int(row[1])) for row in rows]

    def taken(self, study: str, version: int) -> bool:
        """The outbox entry became push jobs; False if a newer version replaced it meanwhile."""
        return bool(self._take(keys=[keys.PUSH_OUTBOX], args=[study, version]))

    def pushed(self, study: str, sink: str, version: int) -> bool:
        """Record that ``version`` reached ``sink``; False if it (or a newer one) already had."""
        return bool(self._pushed(keys=[keys.study_state_key(study)], args=[sink, version]))

    def predecessor(self, study: str, sink: str, version: int) -> int:
        """The version ``version`` supersedes at ``sink`` (0: none): the one delivered there
        before it — also when ``version`` itself is sent again."""
        state = keys.study_state_key(study)
        recorded = self.redis.hget(state, f"prev:{sink}:{version}")
        if recorded is not None:
            return int(recorded)
        delivered = self.pushed_version(study, sink)
        return delivered if delivered < version else 0

    def pushed_version(self, study: str, sink: str) -> int:
        return int(self.redis.hget(keys.study_state_key(study), f"pushed:{sink}") or 0)

    def members(self, study: str) -> list[str]:
        return sorted(text(m) for m in self.redis.smembers(keys.study_members_key(study)))

    def completed_version(self, study: str) -> int:
        return int(self.redis.hget(keys.study_state_key(study), "completed_version") or 0)

    def current_version(self, study: str) -> int:
        return int(self.redis.hget(keys.study_state_key(study), "version") or 0)

    def version_times(self, study: str, version: int) -> tuple[float, float | None] | None:
        """(last arrival, completion or None) of ``version``, in unix seconds, while it is the
        study's current version; None once a newer version opened (its arrivals replace them)."""
        current, last_ms, completed_version, completed_ms = self.redis.hmget(
            keys.study_state_key(study), "version", "last_ms", "completed_version", "completed_ms"
        )
        if last_ms is None or int(current or 0) != version:
            return None
        if int(completed_version or 0) != version or completed_ms is None:
            return int(last_ms) / 1000, None
        return int(last_ms) / 1000, int(completed_ms) / 1000

    def progress(self, study: str, final: Sequence[bool] | None = None) -> StudyProgress | None:
        """One study's state; ``final`` (per member, sorted) when the caller has it."""
        raw = {text(k): text(v) for k, v in self.redis.hgetall(keys.study_state_key(study)).items()}
        if not raw:
            return None
        members = self.members(study)
        if final is None:
            final = Ledger(self.redis).final(members)
        return StudyProgress(
            study_uid=study,
            version=int(raw.get("version", 0)),
            state=raw.get("state", StudyState.OPEN),
            received=len(members),
            final=sum(final),
            completed_version=int(raw.get("completed_version", 0)),
            opened=int(raw.get("opened_ms", 0)) / 1000,
            last_arrival=int(raw.get("last_ms", 0)) / 1000,
            completed=int(raw["completed_ms"]) / 1000 if "completed_ms" in raw else None,
            pushed={
                k.removeprefix("pushed:"): int(v) for k, v in raw.items() if k.startswith("pushed:")
            },
        )

    def recent(self, limit: int = 20) -> list[str]:
        """Studies by latest arrival, newest first."""
        return [text(s) for s in self.redis.zrevrange(keys.STUDIES_RECENT, 0, limit - 1)]
