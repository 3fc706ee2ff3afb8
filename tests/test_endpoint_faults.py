"""Real rq jobs through a real Redis against the emulator in each fault mode: every image ends
embedded exactly once, or quarantined with the server's message; none is lost or duplicated.

The emulator is NOT a medical model; its vectors are a deterministic function of the pixels, so
each stored vector can be checked against the image it belongs to (a shifted answer would show).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image
from rq import Queue, SimpleWorker, Worker

from emulator import EmulatorServer, model
from pacs_embed.compose import build_client
from pipeline.jobs import EMBED_QUEUE, EmbedBatch, ImageItem, enqueue_batch
from pipeline.ledger import Ledger
from pipeline.records import ImageRecord
from pipeline.settings import Settings
from pipeline.store import EmbeddingStore
from tests.test_emulator_faults import Start, emulators
from workers import runtime
from workers.service import EmbedService

KEY = "fault-test-key"
BATCH = 4


def image_png(n: int) -> bytes:
    """A distinct 64x64 8-bit image per n (a ramp at its own angle plus seeded texture)."""
    y, x = np.mgrid[0:64, 0:64] / 64.0
    angle = 0.37 * n
    ramp = np.cos(angle) * x + np.sin(angle) * y
    noise = np.random.default_rng(n).normal(0, 0.05, ramp.shape)
    pixels = np.clip((ramp - ramp.min()) / np.ptp(ramp) + noise, 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def record(sop: str, series: str = "1.2.826.0.1.3") -> ImageRecord:
    return ImageRecord(
        sop_instance_uid=sop,
        study_instance_uid="1.2.826.0.1",
        series_instance_uid=series,
        modality="CT",
        body_part="CHEST",
    )


def items(count: int, series: str = "1.2.826.0.1.3") -> list[ImageItem]:
    return [ImageItem(record(f"{series}.{n}", series), image_png(n)) for n in range(count)]


def enqueue(connection: redis.Redis, images: list[ImageItem], retries: int = 5) -> None:
    queue = Queue(EMBED_QUEUE, connection=connection)
    for start in range(0, len(images), BATCH):
        batch = EmbedBatch(
            images[start].image.series_instance_uid, tuple(images[start : start + BATCH])
        )
        enqueue_batch(queue, batch, timeout=120, retries=retries, retry_intervals=[0])


def settings(url: str, redis_url: str, **endpoint: Any) -> Settings:
    values: dict[str, Any] = {
        "url": url,
        "key": KEY,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "read_timeout": 0.5,
        "connect_timeout": 2,
        "max_attempts": 4,
        "deadline": 60,
        "max_in_flight": 2,
        **endpoint,
    }
    return Settings.load(redis={"url": redis_url}, endpoint=values)


def drain(config: Settings, connection: redis.Redis) -> None:
    """Run the embed queue dry in this process, as `pacs-embed worker --burst` does."""
    ledger = Ledger(connection)
    with build_client(config, connection) as client:
        runtime.bind(EmbedService(client, EmbeddingStore(connection, ledger), ledger))
        worker = SimpleWorker([Queue(EMBED_QUEUE, connection=connection)], connection=connection)
        worker.work(burst=True, logging_level="WARNING")


def check_outcome(
    connection: redis.Redis,
    server: EmulatorServer,
    images: list[ImageItem],
    bad: dict[str, str] | None = None,
) -> None:
    """Good images embedded once with their own vector; bad ones quarantined with the message."""
    bad = bad or {}
    ledger = Ledger(connection)
    store = EmbeddingStore(connection, ledger)
    uids = _uids(images)
    assert ledger.embedded(uids) == [uid not in bad for uid in uids]
    for item in images:
        if item.image.sop_instance_uid not in bad:
            vector = store.get(item.image.sop_instance_uid)
            assert vector is not None
            np.testing.assert_allclose(vector, model.embed_image(item.png), atol=1e-6)
    failures = {f.sop_instance_uid: f.reason for f in ledger.failures()}
    assert set(failures) == set(bad)
    for uid, message in bad.items():
        assert message in failures[uid]
    # Exactly once: the endpoint answered each good image in full one time, no more.
    assert server.stats.snapshot()["images_embedded"] == len(images) - len(bad)
    assert Queue(EMBED_QUEUE, connection=connection).count == 0


@pytest.fixture
def start() -> Iterator[Start]:
    """Starts emulators (port 0) with a seeded fault plan; stops them all afterwards."""
    yield from emulators(KEY, seed=11)


FAULT_MODES = {
    "429 with Retry-After": {"rate_429": 0.5, "retry_after_seconds": 0.02},
    "503": {"rate_503": 0.5},
    "500": {"rate_500": 0.5},
    "408": {"rate_408": 0.5},
    "malformed body": {"rate_malformed": 0.5},
    "hanging request": {"rate_hang": 0.25, "hang_seconds": 30},
    "cold start": {"cold_start_seconds": 0.5, "retry_after_seconds": 0.1},
    "latency": {"latency_ms": 20, "latency_per_image_ms": 2},
    "everything at once": {
        "rate_429": 0.1,
        "rate_503": 0.1,
        "rate_500": 0.1,
        "rate_408": 0.1,
        "rate_malformed": 0.1,
        "rate_hang": 0.05,
        "latency_ms": 5,
    },
}


@pytest.mark.parametrize("faults", FAULT_MODES.values(), ids=FAULT_MODES.keys())
def test_every_image_embedded_exactly_once(
    faults: dict[str, Any], start: Start, redis_server: str, redis_conn: redis.Redis
) -> None:
    """Under each transient fault mode, rq and client retries embed every image exactly once."""
    server = start(**faults)
    images = items(32)
    enqueue(redis_conn, images)
    drain(settings(server.url, redis_server, max_attempts=3), redis_conn)
    check_outcome(redis_conn, server, images)
    injected = server.stats.snapshot()["injected"]
    assert injected or "latency_ms" in faults, "the fault mode injected nothing"


def test_bad_image_quarantined_with_the_server_message(
    start: Start, redis_server: str, redis_conn: redis.Redis
) -> None:
    """An image refused with 400 is quarantined with that message; its batch-mates are embedded."""
    server = start(rate_503=0.3)
    images = items(8)
    broken = ImageItem(record("1.2.826.0.1.3.99"), b"BAD")
    images.insert(3, broken)
    enqueue(redis_conn, images)
    drain(settings(server.url, redis_server), redis_conn)
    check_outcome(
        redis_conn, server, images, bad={broken.image.sop_instance_uid: "image not a readable PNG"}
    )


def test_endpoint_down_for_good_quarantines_every_image(
    start: Start, redis_server: str, redis_conn: redis.Redis
) -> None:
    """When every try fails, each image still reaches a final state: failed, with the cause."""
    server = start(rate_503=1.0)
    images = items(8)
    enqueue(redis_conn, images, retries=1)
    drain(settings(server.url, redis_server, max_attempts=2), redis_conn)
    check_outcome(redis_conn, server, images, bad=dict.fromkeys(_uids(images), "HTTP 503"))


def _uids(images: list[ImageItem]) -> list[str]:
    return [item.image.sop_instance_uid for item in images]


@pytest.mark.e2e
def test_limit_holds_across_worker_processes(
    start: Start, redis_server: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """Four worker processes with a shared limit of 2 never overrun an emulator of capacity 2."""
    server = start(capacity=2, latency_ms=40)
    env = {
        **os.environ,
        "PACS_EMBED_STATE_DIR": str(tmp_path),
        "PACS_EMBED_REDIS__URL": redis_server,
        "PACS_EMBED_ENDPOINT__URL": server.url,
        "PACS_EMBED_ENDPOINT__KEY": KEY,
        "PACS_EMBED_ENDPOINT__MAX_IN_FLIGHT": "2",
        "PACS_EMBED_LOG__LEVEL": "warning",
    }
    workers = [
        subprocess.Popen([sys.executable, "-m", "pacs_embed", "worker"], env=env) for _ in range(4)
    ]
    try:
        _wait(lambda: Worker.count(connection=redis_conn) == 4, "4 workers registered")
        images = items(48)
        enqueue(redis_conn, images)
        ledger = Ledger(redis_conn)
        _wait(lambda: all(ledger.embedded(_uids(images))), "every image embedded")
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(20)
    stats = server.stats.snapshot()
    assert stats["over_capacity"] == 0
    assert stats["max_in_flight"] <= 2
    check_outcome(redis_conn, server, images)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.05)
