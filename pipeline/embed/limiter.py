"""A fleet-wide cap on requests in flight to the endpoint: a Redis semaphore with expiring leases.

Azure ML answers 429 once more than ``2 x max_concurrent_requests_per_instance x instances``
requests are in flight. Every worker on every host therefore takes a lease before each HTTP
attempt and gives it back right after, so adding workers adds waiting, never 429 storms.

Layout in Redis (one pair of keys per endpoint, see ``keys.inflight_key``)::

    <key>        ZSET  lease id -> expiry (ms, Redis server clock)   the slots in use
    <key>:wake   LIST  one token per release, at most ``limit``       wakes one waiter

Each operation is one small Lua script, so "count the live leases and add mine" is atomic:

* acquire: drop expired leases, then add a lease if fewer than ``limit`` remain.
* renew:   push the expiry of a lease still held ``lease_seconds`` ahead (every third of it).
* release: remove the lease and push a wake token.

Expiry uses the Redis server's clock, so hosts with skewed clocks still agree. A worker that dies
holding a lease (SIGKILL, lost host) stops renewing it, and it expires ``lease_seconds`` later.
Waiters block in ``BLPOP`` on the wake list (Redis serves the longest waiting first) and re-check
at least every ``MAX_WAKE_SECONDS``, because an expired lease pushes no token. Waits are bounded
by the caller's timeout.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

import redis
import structlog

from pipeline.errors import TransientEndpointError
from pipeline.keys import INFLIGHT_PATTERN, text, wake_key

log = structlog.get_logger(__name__)

#: A lease not renewed for this long is presumed dead and its slot reused.
DEFAULT_LEASE_SECONDS = 30.0

#: A waiter re-checks the leases at least this often, to notice expired ones.
MAX_WAKE_SECONDS = 0.5

#: Shortest BLPOP timeout sent (0 would block forever).
_MIN_WAIT_SECONDS = 0.01

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: KEYS: leases; ARGV: limit, lease ms, lease id. Returns 1 when the lease was taken.
_ACQUIRE = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  return 1
end
return 0
"""
)

#: KEYS: leases; ARGV: lease ms, lease id. Returns 1 while the lease is still held.
_RENEW = (
    _NOW_MS
    + """
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
  return 1
end
return 0
"""
)

#: KEYS: leases, wake list; ARGV: lease id, limit, wake token ms. Returns 1 if it was held.
_RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return 1
end
return 0
"""

#: KEYS: leases. Live leases (the expired are not counted).
_COUNT = (
    _NOW_MS
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""
)


def drop_leases_of(connection: redis.Redis, owner: str) -> int:
    """Release every lease held by process ``owner`` (``host:pid``), found dead: its slots
    come free now rather than ``lease_seconds`` later. Returns how many were dropped."""
    dropped = 0
    for key in connection.scan_iter(match=INFLIGHT_PATTERN, _type="zset"):
        members = [text(m) for m in connection.zrange(key, 0, -1)]
        held = [m for m in members if m.startswith(f"{owner}:")]
        if held:
            dropped += int(connection.zrem(key, *held))
            wake = wake_key(text(key))
            connection.rpush(wake, *["1"] * len(held))
            connection.pexpire(wake, round(DEFAULT_LEASE_SECONDS * 1000))
    return dropped


class Lease(Protocol):
    """A held slot; ``release()`` is safe to call twice."""

    def release(self) -> None: ...


class InFlightLimiter(Protocol):
    """What the endpoint client needs: a slot per HTTP attempt, waited for at most ``timeout``."""

    @property
    def limit(self) -> int: ...

    def acquire(self, timeout: float) -> Lease | None: ...


class RedisLimiter:
    """At most ``limit`` leases alive at once, across every process sharing this Redis."""

    def __init__(
        self,
        connection: redis.Redis,
        key: str,
        limit: int,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        self._redis = connection
        self._key = key
        self._wake_key = wake_key(key)
        self._limit = limit
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._clock = clock
        self._acquire = connection.register_script(_ACQUIRE)
        self._renew = connection.register_script(_RENEW)
        self._release = connection.register_script(_RELEASE)
        self._count = connection.register_script(_COUNT)
        # Lease ids name their holder, so an operator reading the ZSET sees who holds the slots.
        self._owner = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def limit(self) -> int:
        return self._limit

    def acquire(self, timeout: float) -> RedisLease | None:
        """A lease, or None when no slot came free within ``timeout`` seconds."""
        lease_id = f"{self._owner}:{uuid.uuid4().hex[:12]}"
        deadline = self._clock() + max(0.0, timeout)
        try:
            while True:
                if self._acquire(keys=[self._key], args=[self._limit, self._lease_ms, lease_id]):
                    return RedisLease(self, lease_id)
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return None
                wait = max(_MIN_WAIT_SECONDS, min(remaining, MAX_WAKE_SECONDS))
                self._redis.blpop([self._wake_key], timeout=wait)
        except redis.RedisError as exc:
            raise TransientEndpointError(
                f"in-flight limiter unavailable (Redis: {type(exc).__name__})"
            ) from exc

    def in_flight(self) -> int:
        """Live leases now, fleet-wide."""
        return int(self._count(keys=[self._key]))

    def _renew_lease(self, lease_id: str) -> bool:
        return bool(self._renew(keys=[self._key], args=[self._lease_ms, lease_id]))

    def _release_lease(self, lease_id: str) -> bool:
        return bool(
            self._release(
                keys=[self._key, self._wake_key],
                args=[lease_id, self._limit, self._lease_ms],
            )
        )

    @property
    def _renew_interval(self) -> float:
        return self._lease_ms / 3000.0


class RedisLease:
    """One slot, kept alive by a renewing thread until released."""

    def __init__(self, limiter: RedisLimiter, lease_id: str) -> None:
        self.id = lease_id
        self._limiter = limiter
        self._done = threading.Event()
        self._renewer = threading.Thread(
            target=self._keep_alive, name=f"lease-{lease_id[-12:]}", daemon=True
        )
        self._renewer.start()

    def renew(self) -> bool:
        """Push the expiry ahead; False if the lease was lost (expired and reused, or deleted)."""
        return self._limiter._renew_lease(self.id)

    def release(self) -> None:
        """Give the slot back and wake one waiter. Idempotent; Redis errors are logged only,
        since an unreleased lease frees itself when it expires."""
        if self._done.is_set():
            return
        self._done.set()
        # Free the slot before waiting for the renewer to notice: a waiter is on the critical
        # path. A renewal racing the release finds the lease gone and stops quietly (done).
        try:
            self._limiter._release_lease(self.id)
        except redis.RedisError as exc:
            log.warning("limiter.release_failed", lease=self.id, error=type(exc).__name__)
        self._renewer.join(timeout=5)

    def _keep_alive(self) -> None:
        while not self._done.wait(self._limiter._renew_interval):
            try:
                held = self.renew()
            except redis.RedisError as exc:
                log.warning("limiter.renew_failed", lease=self.id, error=type(exc).__name__)
                continue
            if not held and not self._done.is_set():
                # The process stalled past the lease (or Redis lost it): the slot may be reused,
                # so the fleet can briefly exceed its limit. Nothing to undo; say so.
                log.warning("limiter.lease_lost", lease=self.id)
                return
