"""A dead worker's job moves on in seconds, its endpoint slot comes free, and a scheduler runs
whenever workers do (workers/janitor.py, pacs_embed/supervisor.py).

Before the janitor, a kill -9 mid-request left the batch for rq's job timeout plus its
clean-up (28 minutes measured), the dead worker ``busy`` in /status and its lease holding the
only in-flight slot; and a restart left rq's scheduler lock to a dead process for 13-15 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.worker import Worker

from pipeline import health, keys
from pipeline.embed.limiter import RedisLimiter
from tests import factory
from tests.daemon import Daemon, children, storescu, successes, wait_for
from workers.janitor import MAX_WORKER_DEATHS, SCHEDULER_LOCK_SECONDS, WORKER_DEATHS, Janitor
from workers.overlap import RUN_ALONE

QUEUE = "embed"


def noop() -> None:
    """A job function; these tests never run it."""


def start_on(conn: redis.Redis, queue: Queue, worker_name: str) -> Job:
    """A job taken by a worker ``worker_name``, as rq records it when the worker starts it."""
    job = queue.enqueue(noop, at_front=True)
    worker = SimpleWorker([queue], connection=conn, name=worker_name)
    worker.register_birth()
    taken = queue.dequeue_any([queue], None, connection=conn)
    assert taken is not None and taken[0].id == job.id
    worker.prepare_execution(job)
    return job


def alive(conn: redis.Redis, name: str) -> None:
    conn.set(keys.health_key("worker", name), json.dumps({"state": "busy"}), ex=5)


def test_a_dead_workers_job_is_requeued_first_and_its_slot_and_registration_dropped(
    redis_conn: redis.Redis,
) -> None:
    queue = Queue(QUEUE, connection=redis_conn)
    waiting = queue.enqueue(noop)  # queued before: the recovered job goes in front of it
    dead = start_on(redis_conn, queue, "ghost:4242")
    alive(redis_conn, "busy:7")
    live = start_on(redis_conn, queue, "busy:7")
    limiter = RedisLimiter(redis_conn, keys.inflight_key("http://x", None), 1)
    redis_conn.zadd(keys.inflight_key("http://x", None), {"ghost:4242:lease1": 2**50})
    assert limiter.acquire(0) is None  # the dead worker holds the only slot

    Janitor(redis_conn, queue).tick()

    assert queue.job_ids[:2] == [dead.id, waiting.id]
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == [live.id]
    assert "ghost:4242" not in {w.name for w in Worker.all(queue=queue)}
    assert "busy:7" in {w.name for w in Worker.all(queue=queue)}
    lease = limiter.acquire(0)
    assert lease is not None
    lease.release()


def test_a_job_that_keeps_killing_its_worker_is_failed_with_the_reason(
    redis_conn: redis.Redis,
) -> None:
    queue = Queue(QUEUE, connection=redis_conn)
    job = start_on(redis_conn, queue, "ghost:1")
    job.meta[WORKER_DEATHS] = MAX_WORKER_DEATHS - 1
    job.save_meta()  # type: ignore[no-untyped-call]
    given_up: list[tuple[str, str]] = []

    Janitor(redis_conn, queue, give_up=lambda j, why: given_up.append((j.id, why))).tick()

    assert queue.job_ids == []
    assert FailedJobRegistry(queue=queue).get_job_ids() == [job.id]
    assert given_up and given_up[0][0] == job.id and "died 3 times" in given_up[0][1]


def test_a_worker_that_died_running_two_jobs_counts_against_neither_until_each_runs_alone(
    redis_conn: redis.Redis,
) -> None:
    """A worker running two jobs at once died: either may have killed it, so neither is failed
    (one was at its last death) nor counted; both go back flagged to run alone. The next death
    of a flagged job, alone, counts and fails it."""
    queue = Queue(QUEUE, connection=redis_conn)
    culprit = queue.enqueue(noop, meta={WORKER_DEATHS: MAX_WORKER_DEATHS - 1})
    bystander = queue.enqueue(noop)
    worker = SimpleWorker([queue], connection=redis_conn, name="ghost:3")
    worker.register_birth()
    for job in (culprit, bystander):  # as an overlapping worker starts its two
        queue.dequeue_any([queue], None, connection=redis_conn)
        worker.prepare_execution(job)
    given_up: list[str] = []
    janitor = Janitor(redis_conn, queue, give_up=lambda j, _why: given_up.append(j.id))

    janitor.tick()

    assert sorted(queue.job_ids) == sorted([culprit.id, bystander.id]) and given_up == []
    for job, deaths in ((culprit, MAX_WORKER_DEATHS - 1), (bystander, 0)):
        job.refresh()
        assert job.meta.get(RUN_ALONE) is True
        assert job.meta.get(WORKER_DEATHS, 0) == deaths

    for _ in queue.job_ids:  # the next worker takes the culprit alone, and dies again
        queue.dequeue_any([queue], None, connection=redis_conn)
    alone = SimpleWorker([queue], connection=redis_conn, name="ghost:4")
    alone.register_birth()
    alone.prepare_execution(culprit)
    janitor.tick()
    assert given_up == [culprit.id]
    assert FailedJobRegistry(queue=queue).get_job_ids() == [culprit.id]


def test_two_janitors_requeue_a_dead_workers_job_once(redis_conn: redis.Redis) -> None:
    queue = Queue(QUEUE, connection=redis_conn)
    job = start_on(redis_conn, queue, "ghost:2")
    first, second = Janitor(redis_conn, queue), Janitor(redis_conn, queue)
    first.tick()
    second.tick()
    assert queue.job_ids == [job.id]


def test_the_scheduler_lock_is_given_back_on_stop_and_the_next_worker_runs_retries(
    redis_conn: redis.Redis,
) -> None:
    queue = Queue(QUEUE, connection=redis_conn)
    before = Janitor(redis_conn, queue)
    before.start()
    wait_for(lambda: redis_conn.get(keys.scheduler_lock(QUEUE)) is not None, 5, "the lock taken")
    before.stop()
    assert redis_conn.get(keys.scheduler_lock(QUEUE)) is None

    after = Janitor(redis_conn, queue)
    retry = queue.enqueue_in(timedelta(seconds=1), noop)  # as rq schedules a job's retry
    after.start()
    try:
        wait_for(lambda: retry.id in queue.job_ids, 5, "the retry moved to the queue when due")
    finally:
        after.stop()


def test_a_killed_schedulers_lock_lapses_within_seconds(redis_conn: redis.Redis) -> None:
    queue = Queue(QUEUE, connection=redis_conn)
    killed, successor = Janitor(redis_conn, queue), Janitor(redis_conn, queue)
    assert killed.lock.hold()  # and then never renewed nor released: a kill -9
    assert not successor.lock.hold()
    started = time.monotonic()
    wait_for(successor.lock.hold, SCHEDULER_LOCK_SECONDS + 2, "the lock to lapse")
    assert time.monotonic() - started <= SCHEDULER_LOCK_SECONDS + 1


# -- through `pacs-embed run` ------------------------------------------------------------------

needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")


def private_redis(daemon: Daemon) -> redis.Redis:
    url = (daemon.state_dir / "redis" / "url").read_text().strip()
    return redis.Redis.from_url(url)


@pytest.mark.e2e
@needs_dcmtk
def test_kill_9_of_a_worker_mid_request_costs_seconds_not_minutes(
    daemon: Daemon, tmp_path: Path
) -> None:
    daemon.env["PACS_EMBED_EMULATOR__LATENCY_MS"] = "3000"
    daemon.start()
    conn = private_redis(daemon)
    ds = factory.ct_slice(study_uid="1.2.8", series_uid="1.2.8.1", instance_number=1, rows=32)
    sent = storescu(daemon.dicom_port, [factory.write(ds, tmp_path / "ct.dcm")])
    assert successes(sent) == 1, sent.stdout + sent.stderr

    def busy() -> list[str]:
        return [n for n, r in health.reports(conn, "worker").items() if r["state"] == "busy"]

    daemon.wait_for(lambda: len(busy()) == 1, 30, "a worker busy with the batch")
    victim = busy()[0]
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
    killed = time.monotonic()

    daemon.wait_embedded(1, timeout=30)
    # The request takes 3 s; recovery must add seconds, not rq's 16-minute job timeout.
    assert time.monotonic() - killed < 15
    assert victim not in health.reports(conn, "worker")
    assert victim not in {w.name for w in Worker.all(connection=conn)}
    events = daemon.log_lines()
    assert any(e.get("event") == "run.worker_jobs_requeued" and e["jobs"] == 1 for e in events)


@pytest.mark.e2e
@needs_dcmtk
def test_a_killed_private_redis_is_restarted_from_its_aof_and_work_goes_on(
    daemon: Daemon, tmp_path: Path
) -> None:
    daemon.start()
    first = factory.ct_slice(study_uid="1.2.9", series_uid="1.2.9.1", instance_number=1, rows=32)
    sent = storescu(daemon.dicom_port, [factory.write(first, tmp_path / "a.dcm")])
    assert successes(sent) == 1, sent.stdout + sent.stderr
    daemon.wait_embedded(1, timeout=60)
    (redis_pid,) = children(daemon, b"redis-server")

    os.kill(redis_pid, signal.SIGKILL)
    # The listener keeps acknowledging while Redis is away (the spool is the truth).
    second = factory.ct_slice(study_uid="1.2.9", series_uid="1.2.9.1", instance_number=2, rows=32)
    sent = storescu(daemon.dicom_port, [factory.write(second, tmp_path / "b.dcm")])
    assert successes(sent) == 1, sent.stdout + sent.stderr

    daemon.wait_for(
        lambda: (
            len(children(daemon, b"redis-server")) == 1
            and children(daemon, b"redis-server") != [redis_pid]
        ),
        30,
        "a new redis-server",
    )
    # Both: the first survived in the AOF, the second was handed on once Redis was back.
    daemon.wait_embedded(2, timeout=60)
    assert daemon.status()["instances"]["received"] == 2
    roles = {(e.get("event"), e.get("role")) for e in daemon.log_lines()}
    assert ("child.exited", "redis") in roles and ("child.restarted", "redis") in roles


def test_a_job_its_live_worker_no_longer_runs_is_requeued(redis_conn: redis.Redis) -> None:
    """A worker that lost Redis mid-job starts over under the same name: alive, idle, and its
    old execution still in the started registry. Once that is older than ORPHAN_SECONDS, the
    job goes back to the queue; a job the worker reports running stays."""
    queue = Queue(QUEUE, connection=redis_conn)
    lost = start_on(redis_conn, queue, "again:9")
    running = start_on(redis_conn, queue, "busy:8")
    for name, job in (("again:9", None), ("busy:8", running.id)):
        report = {"state": "busy" if job else "idle", "job": job}
        redis_conn.set(keys.health_key("worker", name), json.dumps(report), ex=5)
    janitor = Janitor(redis_conn, queue)
    janitor.tick()
    assert queue.job_ids == []  # too recent to tell from a job just starting
    for entry in redis_conn.zrange(StartedJobRegistry(queue=queue).key, 0, -1):
        redis_conn.hset(f"rq:execution:{entry.decode()}", "created_at", time.time() - 60)
    janitor.tick()
    assert queue.job_ids == [lost.id]
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == [running.id]
