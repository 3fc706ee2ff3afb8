"""A worker runs a few jobs at once (workers/overlap.py), within the fleet-wide in-flight limit,
and every job it took is running, reported and recovered: against a real Redis.

Jobs here are gated on a Redis key, so a test decides when they end; they record what they did
in Redis, where the test (or a worker in another process) reads it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.registry import StartedJobRegistry

from pipeline.embed.client import EndpointClient
from pipeline.embed.contract import EMBEDDING_DIM
from pipeline.embed.limiter import RedisLimiter
from pipeline.jobs import EmbedBatch, ImageItem
from pipeline.keys import EMBEDDED, health_key, inflight_key, text
from pipeline.ledger import Ledger
from pipeline.records import ImageRecord
from pipeline.store import EmbeddingStore
from tests.daemon import wait_for
from workers import runtime
from workers.janitor import Janitor, reap, worker_name
from workers.jobs import embed_batch
from workers.overlap import RUN_ALONE, OverlappingWorker
from workers.service import EmbedService

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "overlap-test"
GATE = "test:gate"
STARTED = "test:started"
DONE = "test:done"
#: How long a test waits for a worker to get somewhere.
WAIT = 15
EVENTS = "test:events"


def gated(name: str) -> str:
    """A job: note it started, wait until the gate opens (at most 30 s), note it done."""
    conn = redis.Redis.from_url(os.environ["TEST_REDIS_URL"])
    conn.rpush(STARTED, name)
    conn.rpush(EVENTS, f"start {name}")
    deadline = time.monotonic() + 30
    while not conn.exists(GATE):
        if time.monotonic() > deadline:
            raise TimeoutError("the gate never opened")
        time.sleep(0.01)
    conn.rpush(EVENTS, f"end {name}")
    conn.rpush(DONE, name)
    return name


def texts(conn: redis.Redis, key: str) -> list[str]:
    return [text(v) for v in conn.lrange(key, 0, -1)]


@pytest.fixture
def queue(redis_server: str, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Queue:
    monkeypatch.setenv("TEST_REDIS_URL", redis_server)
    return Queue(QUEUE, connection=redis_conn)


def enqueue(queue: Queue, *names: str) -> list[Job]:
    return [queue.enqueue(gated, name, job_id=f"job-{name}", result_ttl=0) for name in names]


def open_gate_when(conn: redis.Redis, ready: Callable[[], bool], then: Callable[[], None]) -> None:
    """In a thread: once ``ready()``, run ``then()``, and open the gate whatever happened (the
    worker's loop holds the main thread until its jobs end)."""

    def run() -> None:
        try:
            wait_for(ready, WAIT, "the jobs to start")
            then()
        finally:
            conn.set(GATE, 1)

    threading.Thread(target=run, daemon=True).start()


def test_two_jobs_run_at_once_and_a_third_waits_on_the_queue(
    queue: Queue, redis_conn: redis.Redis
) -> None:
    """With concurrency 2, two gated jobs run together (so the gate can open while both wait)
    and the third is not dequeued until one of them ends: nothing is held back in memory."""
    enqueue(queue, "a", "b", "c")
    worker = OverlappingWorker([queue], connection=redis_conn, concurrency=2)
    seen: dict[str, object] = {}

    def look() -> None:
        seen["running"] = sorted(worker.running_jobs())
        seen["queued"] = queue.job_ids

    open_gate_when(redis_conn, lambda: redis_conn.llen(STARTED) == 2, look)
    worker.work(burst=True)
    assert seen == {"running": ["job-a", "job-b"], "queued": ["job-c"]}
    assert sorted(texts(redis_conn, DONE)) == ["a", "b", "c"]
    assert worker.running_jobs() == []
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []


def test_a_job_flagged_to_run_alone_runs_with_nothing_beside_it(
    queue: Queue, redis_conn: redis.Redis
) -> None:
    """A job the janitor flagged (its worker died running it beside another) is taken while
    another job runs, waits for it to end, and runs alone: the job after it is not dequeued
    until it has ended."""
    _, flagged, after = enqueue(queue, "a", "b", "c")
    flagged.meta[RUN_ALONE] = True
    flagged.save_meta()  # type: ignore[no-untyped-call]
    worker = OverlappingWorker([queue], connection=redis_conn, concurrency=2)
    seen: dict[str, object] = {}

    def look() -> None:
        wait_for(lambda: len(worker.running_jobs()) == 2, WAIT, "the flagged job to be taken")
        seen.update(started=texts(redis_conn, STARTED), queued=queue.job_ids)

    open_gate_when(redis_conn, lambda: redis_conn.llen(STARTED) == 1, look)
    worker.work(burst=True)
    assert seen == {"started": ["a"], "queued": [after.id]}  # b taken, waiting; c not taken
    assert texts(redis_conn, EVENTS) == ["start a", "end a", "start b", "end b", "start c", "end c"]


def test_one_job_at_a_time_when_concurrency_is_1(queue: Queue, redis_conn: redis.Redis) -> None:
    """concurrency=1 keeps rq's one job at a time: the second starts only after the first."""
    enqueue(queue, "a", "b")
    worker = OverlappingWorker([queue], connection=redis_conn, concurrency=1)
    seen: dict[str, object] = {}
    open_gate_when(
        redis_conn,
        lambda: redis_conn.llen(STARTED) == 1,
        lambda: seen.update(running=worker.running_jobs(), queued=queue.job_ids),
    )
    worker.work(burst=True)
    assert seen == {"running": ["job-a"], "queued": ["job-b"]}
    assert texts(redis_conn, DONE) == ["a", "b"]


def test_the_janitor_leaves_every_running_job_and_requeues_only_an_orphan(
    queue: Queue, redis_conn: redis.Redis
) -> None:
    """Both jobs a live worker runs are in its report, so neither is taken for an orphan, even
    long after they started; a started job of that worker that it does not run is requeued."""
    orphan = queue.enqueue(gated, "orphan", job_id="job-orphan")
    taken = queue.dequeue_any([queue], None, connection=redis_conn)
    assert taken is not None
    enqueue(queue, "a", "b")
    worker = OverlappingWorker([queue], connection=redis_conn, name=worker_name(), concurrency=2)
    # Started under this worker's name and never run (the worker lost Redis mid-job):
    lost = SimpleWorker([queue], connection=redis_conn, name=worker_name())
    lost.prepare_execution(orphan)
    redis_conn.delete(lost.key)  # that registration went with the lost connection
    janitor = Janitor(redis_conn, queue, running_jobs=worker.running_jobs)
    seen: dict[str, object] = {}

    def tick_long_after() -> None:
        registry = StartedJobRegistry(queue=queue)
        for entry in redis_conn.zrange(registry.key, 0, -1):
            redis_conn.hset(f"rq:execution:{text(entry)}", "created_at", time.time() - 60)
        janitor.tick()
        report = json.loads(redis_conn.get(health_key("worker", worker_name())) or "{}")
        seen.update(
            report=sorted(report.get("jobs", [])),
            queued=queue.job_ids,
            started=sorted(registry.get_job_ids(cleanup=False)),
        )

    def both_running() -> bool:
        return redis_conn.llen(STARTED) == 2 and len(worker.running_jobs()) == 2

    open_gate_when(redis_conn, both_running, tick_long_after)
    worker.work(burst=True, max_jobs=2)
    assert seen == {
        "report": ["job-a", "job-b"],
        "queued": ["job-orphan"],
        "started": ["job-a", "job-b"],
    }


VICTIM = """
import sys
import redis
from rq import Queue, SimpleWorker
from workers.overlap import OverlappingWorker
conn = redis.Redis.from_url(sys.argv[1])
worker = OverlappingWorker([Queue(sys.argv[2], connection=conn)], connection=conn,
                           name=sys.argv[3], concurrency=2)
worker.work(logging_level="WARNING")
"""


@pytest.fixture
def victim(redis_server: str) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Start a worker process named ``name`` (concurrency 2) on the test queue."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "TEST_REDIS_URL": redis_server}
        args = [sys.executable, "-c", VICTIM, redis_server, QUEUE, name]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_a_killed_worker_with_two_jobs_running_loses_neither(
    queue: Queue, redis_conn: redis.Redis, victim: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    """kill -9 of a worker running two jobs (a third still queued): reaping puts both back at
    the front, and a new worker runs each of the three exactly once."""
    enqueue(queue, "a", "b", "c")
    proc = victim("victim:1")
    wait_for(lambda: redis_conn.llen(STARTED) == 2, WAIT, "the victim to start two jobs")
    assert queue.job_ids == ["job-c"]
    proc.kill()
    proc.wait(10)

    assert reap(redis_conn, queue, dead=lambda name: name == "victim:1") == 2
    assert sorted(queue.job_ids[:2]) == ["job-a", "job-b"] and queue.job_ids[2] == "job-c"
    for job_id in ("job-a", "job-b"):  # either may have killed it: each runs alone next
        assert Job.fetch(job_id, connection=redis_conn).meta == {RUN_ALONE: True}
    redis_conn.set(GATE, 1)
    OverlappingWorker([queue], connection=redis_conn, concurrency=2).work(burst=True)
    assert sorted(texts(redis_conn, DONE)) == ["a", "b", "c"]


def poison() -> None:
    """A job that kills its worker, as an out-of-memory kill would; the first time once the job
    beside it has started."""
    conn = redis.Redis.from_url(os.environ["TEST_REDIS_URL"])
    conn.rpush(STARTED, "poison")
    deadline = time.monotonic() + 1
    while conn.llen(STARTED) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_poison_job_is_failed_on_its_own_deaths_and_the_job_beside_it_runs(
    queue: Queue, redis_conn: redis.Redis, victim: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    """A batch that kills every worker it runs in, started beside an innocent one: the first
    death counts against neither; then each runs alone, the poison is failed after its own
    three deaths and the innocent one completes."""
    poisoned = queue.enqueue(poison, job_id="job-poison", result_ttl=0)
    enqueue(queue, "innocent")
    given_up: list[str] = []
    for n in range(1, 6):
        name = f"victim:{n}"
        proc = victim(name)
        if n == 1:
            wait_for(lambda: redis_conn.llen(STARTED) == 2, WAIT, "both jobs to start together")
            redis_conn.set(GATE, 1)
        proc.wait(20)  # every worker takes the poison sooner or later
        reap(redis_conn, queue, dead=name.__eq__, give_up=lambda job, _: given_up.append(job.id))
        if given_up:
            break
    assert given_up == ["job-poison"] and n == 4  # together once, then alone three times
    victim("victim:next")  # if the poison went first each time, the innocent one is still due
    wait_for(lambda: texts(redis_conn, DONE) == ["innocent"], WAIT, "the innocent job to end")
    assert queue.job_ids == []
    assert Job.fetch(poisoned.id, connection=redis_conn).get_status() == "failed"


def test_sigterm_lets_both_running_jobs_finish_and_takes_no_more(
    queue: Queue, redis_conn: redis.Redis, victim: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    """A warm shutdown stops dequeueing and waits for the jobs running: both finish and are
    recorded, the worker exits cleanly, and the third job stays on the queue."""
    enqueue(queue, "a", "b", "c")
    proc = victim("stopping:1")
    wait_for(lambda: redis_conn.llen(STARTED) == 2, WAIT, "the worker to start two jobs")
    proc.send_signal(signal.SIGTERM)
    wait_for(
        lambda: redis_conn.hexists("rq:worker:stopping:1", "shutdown_requested_date"),
        WAIT,
        "the worker to take the stop request",
    )
    assert proc.poll() is None, "the worker must wait for its jobs"
    redis_conn.set(GATE, 1)
    assert proc.wait(15) == 0
    assert sorted(texts(redis_conn, DONE)) == ["a", "b"]
    assert queue.job_ids == ["job-c"]
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []


def test_sigterm_while_the_loop_waits_for_work_beside_a_job_stops_once_it_ends(
    queue: Queue, redis_conn: redis.Redis, victim: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    """One job running, a thread free: rq's loop waits for work on the queue (a blocking pop)
    and its state reads idle, which is what makes rq's warm shutdown end that wait at once.
    The job still finishes and the worker exits, without waiting out the pop. (Keeping rq's
    state "busy" while a thread runs a job, for ``rq info``, broke exactly this: the worker sat
    in its pop after SIGTERM until killed.)"""
    enqueue(queue, "a")
    proc = victim("waiting:1")
    wait_for(lambda: redis_conn.llen(STARTED) == 1, WAIT, "the worker to start the job")

    def waiting_for_work() -> bool:  # rq's loop blocks in BLMOVE on the queue
        return any(c["cmd"] == "blmove" and "b" in c["flags"] for c in redis_conn.client_list())

    wait_for(waiting_for_work, WAIT, "the loop to block waiting for work")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not waiting_for_work(), WAIT, "the stop request to end the wait")
    assert texts(redis_conn, DONE) == []  # the job still runs
    redis_conn.set(GATE, 1)
    assert proc.wait(15) == 0
    assert texts(redis_conn, DONE) == ["a"]


def image(series: str, n: int) -> ImageItem:
    record = ImageRecord(
        sop_instance_uid=f"{series}.{n}",
        study_instance_uid="1.2",
        series_instance_uid=series,
        modality="CT",
        body_part="CHEST",
    )
    return ImageItem(record, bytes([n]) * 20)


class SlowEndpoint:
    """A MockTransport handler answering after ``seconds``, counting requests in flight."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.now = 0
        self.most = 0
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.seconds)
        with self._lock:
            self.now -= 1
        data = json.loads(request.content)["input_data"]["data"]
        rng = np.random.default_rng(len(data))
        rows = [{"image_features": [rng.standard_normal(EMBEDDING_DIM).tolist()]} for _ in data]
        return httpx.Response(200, json=rows)


@pytest.mark.parametrize(("limit", "concurrency", "most"), [(1, 3, 1), (2, 3, 2), (3, 1, 1)])
def test_requests_in_flight_never_pass_the_limit_and_reach_it(
    redis_conn: redis.Redis, limit: int, concurrency: int, most: int
) -> None:
    """Embed jobs through the real client and limiter: a worker running ``concurrency`` jobs
    has min(concurrency, limit) requests on the wire at most, and reaches that many; every
    image is stored once."""
    endpoint = SlowEndpoint(0.3)
    limiter = RedisLimiter(redis_conn, inflight_key("http://mock/score", f"t{limit}"), limit)
    client = EndpointClient(
        "http://mock/score", key="k", transport=httpx.MockTransport(endpoint), limiter=limiter
    )
    ledger = Ledger(redis_conn)
    runtime.bind(EmbedService(client, EmbeddingStore(redis_conn, ledger), ledger))
    queue = Queue(QUEUE, connection=redis_conn)
    for s in range(6):
        series = f"1.2.{s}"
        batch = EmbedBatch(series, tuple(image(series, n) for n in (1, 2)))
        queue.enqueue(embed_batch, batch.to_payload(), result_ttl=0)
    OverlappingWorker([queue], connection=redis_conn, concurrency=concurrency).work(burst=True)
    client.close()
    assert endpoint.most == most
    assert int(redis_conn.scard(EMBEDDED)) == 12
    assert limiter.in_flight() == 0


def test_concurrency_below_1_is_refused(redis_conn: redis.Redis) -> None:
    """A worker that could run no job is a configuration error, said at once."""
    with pytest.raises(ValueError, match="at least 1"):
        OverlappingWorker(
            [Queue(QUEUE, connection=redis_conn)], connection=redis_conn, concurrency=0
        )
