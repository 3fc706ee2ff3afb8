"""The fleet-wide in-flight limiter (Redis semaphore with expiring leases), against a real Redis."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.embed.limiter import RedisLimiter
from pipeline.errors import TransientEndpointError
from pipeline.keys import inflight_key
from tests.conftest import free_port

KEY = inflight_key("http://127.0.0.1:1/score", "test")


def test_limit_is_enforced_and_a_release_frees_a_slot(redis_conn: redis.Redis) -> None:
    """With limit 2, a third lease waits in vain until one of the two is released."""
    limiter = RedisLimiter(redis_conn, KEY, 2)
    first, second = limiter.acquire(1), limiter.acquire(1)
    assert first is not None and second is not None
    assert limiter.in_flight() == 2
    assert limiter.acquire(0.05) is None
    first.release()
    third = limiter.acquire(5)
    assert third is not None
    second.release()
    third.release()
    assert limiter.in_flight() == 0


def test_release_is_idempotent(redis_conn: redis.Redis) -> None:
    """Releasing a lease twice frees one slot, not two."""
    limiter = RedisLimiter(redis_conn, KEY, 1)
    lease = limiter.acquire(1)
    assert lease is not None
    lease.release()
    lease.release()
    other = limiter.acquire(1)
    assert other is not None
    assert limiter.acquire(0) is None
    other.release()


def test_a_waiter_is_woken_by_a_release(redis_conn: redis.Redis) -> None:
    """A worker blocked on a full limiter gets the slot a release frees, before its timeout."""
    limiter = RedisLimiter(redis_conn, KEY, 1)
    held = limiter.acquire(1)
    assert held is not None
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(limiter.acquire(30)))
    waiter.start()
    while not any(client.get("cmd") == "blpop" for client in redis_conn.client_list()):
        time.sleep(0.01)  # the waiter is blocked in BLPOP
    held.release()
    waiter.join(30)
    lease = got[0]
    assert lease is not None
    lease.release()  # type: ignore[attr-defined]


def test_threads_never_exceed_the_limit(redis_conn: redis.Redis) -> None:
    """Eight threads taking and returning leases never hold more than the limit at once."""
    limiter = RedisLimiter(redis_conn, KEY, 3)
    lock = threading.Lock()
    holding, peak, taken = 0, 0, 0

    def work() -> None:
        nonlocal holding, peak, taken
        for _ in range(15):
            lease = limiter.acquire(30)
            assert lease is not None
            with lock:
                holding += 1
                taken += 1
                peak = max(peak, holding)
            time.sleep(0.002)
            with lock:
                holding -= 1
            lease.release()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert taken == 8 * 15
    assert peak <= 3
    assert limiter.in_flight() == 0


def test_a_held_lease_is_renewed_past_its_lifetime(redis_conn: redis.Redis) -> None:
    """While held, a lease's expiry keeps moving ahead, so a slow request keeps its slot."""
    limiter = RedisLimiter(redis_conn, KEY, 1, lease_seconds=1.0)
    lease = limiter.acquire(1)
    assert lease is not None
    first = redis_conn.zscore(KEY, lease.id)
    assert first is not None
    deadline = time.monotonic() + 20
    while (redis_conn.zscore(KEY, lease.id) or 0) <= first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (redis_conn.zscore(KEY, lease.id) or 0) > first
    lease.release()
    assert redis_conn.zcard(KEY) == 0


def test_renew_reports_a_lost_lease(redis_conn: redis.Redis) -> None:
    """A lease that vanished from Redis (expired and reused, flushed) is reported lost."""
    limiter = RedisLimiter(redis_conn, KEY, 1)
    lease = limiter.acquire(1)
    assert lease is not None
    assert lease.renew()
    redis_conn.delete(KEY)
    assert not lease.renew()
    lease.release()


HOLDER = """
import sys, time, redis
from pipeline.embed.limiter import RedisLimiter
limiter = RedisLimiter(redis.Redis.from_url(sys.argv[1]), sys.argv[2], 1, lease_seconds=1.0)
print("held" if limiter.acquire(5) else "none", flush=True)
time.sleep(30)  # killed by the test long before this ends
"""


@pytest.mark.e2e
def test_a_dead_workers_lease_expires(redis_server: str, redis_conn: redis.Redis) -> None:
    """A process killed (-9) while holding the only slot stops renewing it; the slot comes back."""
    limiter = RedisLimiter(redis_conn, KEY, 1)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_server, KEY], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        assert limiter.acquire(0) is None  # really held by the other process
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    lease = limiter.acquire(30)
    assert lease is not None
    lease.release()


def test_redis_down_is_a_transient_error() -> None:
    """Without Redis no slot can be had: a transient error, so the job is retried later."""
    connection = redis.Redis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    limiter = RedisLimiter(connection, KEY, 1)
    with pytest.raises(TransientEndpointError, match="limiter unavailable"):
        limiter.acquire(1)
    connection.close()


def test_keys_differ_per_deployment() -> None:
    """Two deployments behind one endpoint get separate limits; the key holds no URL text."""
    assert inflight_key("https://e/score", "a") != inflight_key("https://e/score", "b")
    assert "https" not in inflight_key("https://e/score")


def test_bad_arguments_are_refused(redis_conn: redis.Redis) -> None:
    """A limit below 1 or a non-positive lease time is a mistake, refused at construction."""
    with pytest.raises(ValueError, match="limit"):
        RedisLimiter(redis_conn, KEY, 0)
    with pytest.raises(ValueError, match="lease_seconds"):
        RedisLimiter(redis_conn, KEY, 1, lease_seconds=0)
