"""The Redis namespace: every key the code writes is one pipeline/keys.py declares (pattern and
type), and nothing is written outside ``pe:`` but rq's ``rq:``.

A short real run goes through every API that writes Redis (ledger, intake, health, the embed
service with its store, reference sets and label prompts, endpoint metrics, the in-flight
limiter, the embed queue) against a real Redis, looking at the keys after each step (a set or a
lease emptied later disappears). A key built outside keys.py fails here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import redis
from rq import Queue

from dicom_listener import arrivals
from dicom_listener.arrivals import ArrivalLog
from dicom_listener.retention import Retention
from dicom_listener.spool import Spool
from pipeline import health, keys
from pipeline.deadletters import DeadLetters
from pipeline.detect.detector import Detector, reference_store
from pipeline.detect.labels import PromptEmbeddings
from pipeline.embed.contract import EMBEDDING_DIM, EmbedResult, Row
from pipeline.embed.limiter import RedisLimiter
from pipeline.intake import Event, IntakeLog, Kind
from pipeline.jobs import (
    EMBED_QUEUE,
    PUSH_QUEUE,
    EmbedBatch,
    ImageItem,
    enqueue_batch,
    enqueue_push,
)
from pipeline.ledger import Ledger, Stage
from pipeline.metrics import EndpointMetrics
from pipeline.records import ImageRecord
from pipeline.requeue import requeue_instance
from pipeline.settings import DetectSettings, StudySettings
from pipeline.stage_metrics import ListenerMetrics, StageMetrics
from pipeline.store import EmbeddingStore
from pipeline.studies import Studies
from workers.janitor import Janitor
from workers.service import EmbedService

URL = "http://127.0.0.1:1/score"
SETTINGS = DetectSettings(alpha=0.05, min_reference=30, max_reference=500, k=5)


def _unit(seed: int, n: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, EMBEDDING_DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class Endpoint:
    """Images and prompts -> random unit vectors (what they mean does not matter here)."""

    def embed_images(self, pngs: list[bytes]) -> np.ndarray:
        return _unit(len(pngs), len(pngs))

    def embed(self, rows: Sequence[Row]) -> EmbedResult:
        vectors = _unit(99, len(rows))
        return EmbedResult(image=vectors * np.nan, text=vectors, scaling_factor=4.5)


def record(uid: str) -> ImageRecord:
    return ImageRecord(
        sop_instance_uid=uid,
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        modality="CT",
        body_part="Chest",
    )


def exercise(conn: redis.Redis, tmp: Path) -> dict[str, str]:
    """Key -> Redis type of every key seen during a short run through every writer."""
    seen: dict[str, str] = {}

    def look() -> None:
        for key in conn.scan_iter(count=1000):
            seen.setdefault(keys.text(key), keys.text(conn.type(key)))

    # The listener: ledger states, intake events, dispatcher health.
    ledger = Ledger(conn)
    uids = [f"1.2.3.{n}" for n in range(1, 14)]
    ledger.spooled(uids, {uid: "digest" for uid in uids})
    now = [1000.0]
    studies = Studies(conn, StudySettings(stable_seconds=1), clock=lambda: now[0])
    studies.arrived([("1.2", uid) for uid in uids])
    ledger.converting(uids[:4])
    look()
    embeddable = uids[:-2]
    for uid in embeddable:
        ledger.converted(uid, {"modality": "CT", "body_part": "CHEST"}, frames=[0])
    ledger.queued(embeddable, "embed-test")
    ledger.skipped(uids[-2], "not an image")
    ledger.failed(uids[-1], Stage.CONVERT, "unreadable")
    requeue_instance(conn, ledger, uids[-1])  # an operator asks for it again (POST /requeue)
    ledger.count("resends")
    intake = IntakeLog(conn)
    intake.record(
        Event(Kind.REFUSED, "SOP Class not supported", "PACS", "10.0.0.1", status="0xA900")
    )
    intake.record(Event(Kind.NONCONFORMANT_UID, "leading zero", "PACS", "10.0.0.1"))
    health.publish(conn, "dispatcher", {"ok": True})
    arrival_log = ArrivalLog(conn, "node-1")  # a listener process hands on what it spooled
    arrival_log.start()
    arrival_log.add(uids[0])
    arrival_log.stop()
    arrivals.publish_backlog(conn, "node-1", 1)  # as its dispatcher reports
    look()
    assert arrivals.take(conn, "node-1", 10) == ([uids[0]], True)
    listener_metrics = ListenerMetrics(conn)  # C-STOREs, associations, conversions
    listener_metrics.stored(0x0000, 1000)
    listener_metrics.accepted()
    listener_metrics.converted("converted", 0.2)
    listener_metrics.flush()
    batch = EmbedBatch(
        "1.2.3",
        tuple(ImageItem(record(uid), uid.encode()) for uid in embeddable),
    )
    enqueue_batch(Queue(EMBED_QUEUE, connection=conn), batch, timeout=60, retries=1)
    look()

    # A worker: store, verdicts, reference set, label prompts, endpoint metrics and limiter.
    endpoint = Endpoint()
    prompts = PromptEmbeddings(conn, endpoint, URL, "d1", SETTINGS.label_prompts)
    detector = Detector(SETTINGS, reference_store(SETTINGS, conn), prompts)
    service = EmbedService(endpoint, EmbeddingStore(conn, ledger), ledger, detector)
    assert service.run(batch).embedded == len(embeddable)
    metrics = EndpointMetrics(conn)
    metrics.attempt(status="200", seconds=0.2, bytes_sent=100, images=len(embeddable))
    metrics.retry("429")
    metrics.slot_wait(0.01)
    StageMetrics(conn).flagged({"outlier": 1, "label_mismatch": 0})
    StageMetrics(conn).study_completed(3.5)
    limiter = RedisLimiter(conn, keys.inflight_key(URL, "d1"), 2)
    lease = limiter.acquire(1)
    assert lease is not None
    look()
    lease.release()
    # The push service: a study version completes, is pushed, its files become eligible.
    now[0] += 10
    look()
    assert [done.version for done in studies.complete_due()] == [1]
    look()
    assert studies.outbox() == [("1.2", 1)]
    enqueue_push(Queue(PUSH_QUEUE, connection=conn), "webhook", "1.2", 1)
    assert studies.taken("1.2", 1) and studies.pushed("1.2", "webhook", 1)
    conn.hincrby(keys.PUSH_COUNTS, "webhook|sent", 1)  # as PushService counts
    DeadLetters(conn).add("push-dicom-1-2-v1", "dicom", "1.2", 1, "refused")
    Retention(Spool(tmp / "spool", tmp / "quarantine"), conn, hours=1, low_free_bytes=0).eligible(
        uids
    )
    look()
    janitor = Janitor(conn, Queue(EMBED_QUEUE, connection=conn))  # report, scheduler lock
    janitor.tick()
    look()
    janitor.stop()
    return seen


@pytest.fixture
def written(redis_conn: redis.Redis, tmp_path: Path) -> dict[str, str]:
    return exercise(redis_conn, tmp_path)


def test_every_key_written_is_declared_with_its_type(written: dict[str, str]) -> None:
    """Each ``pe:`` key matches a pattern of keys.NAMESPACE and has the type it declares."""
    ours = {key: kind for key, kind in written.items() if key.startswith(f"{keys.PREFIX}:")}
    undeclared = sorted(key for key in ours if keys.declared(key) is None)
    assert not undeclared, f"keys built outside pipeline/keys.py: {undeclared}"
    mistyped = {
        key: (kind, declared.type)
        for key, kind in ours.items()
        if (declared := keys.declared(key)) is not None and declared.type != kind
    }
    assert not mistyped, f"key -> (actual, declared) type: {mistyped}"


def test_every_declared_key_is_written_by_the_run(written: dict[str, str]) -> None:
    """No dead rows: the run above exercises every pattern (so it checks them all)."""
    used = {declared.pattern for key in written if (declared := keys.declared(key)) is not None}
    assert sorted(k.pattern for k in keys.NAMESPACE if k.pattern not in used) == []


def test_only_pe_and_rq_namespaces_are_written(written: dict[str, str]) -> None:
    """An operator sharing the Redis keeps ``pe:`` and ``rq:`` free; nothing else is touched."""
    assert any(key.startswith(f"{keys.RQ_PREFIX}:") for key in written)  # the queue was used
    outside = sorted(
        key for key in written if not key.startswith((f"{keys.PREFIX}:", f"{keys.RQ_PREFIX}:"))
    )
    assert outside == []


def test_namespace_table_documents_every_pattern() -> None:
    """The module docstring, which operators read, lists every declared pattern and type."""
    doc = keys.__doc__ or ""
    rows = {
        line.split()[0]: line.split()[1] for line in doc.splitlines() if line.startswith("    pe:")
    }
    assert {k.pattern: k.type for k in keys.NAMESPACE} == rows


def test_endpoint_identity_is_shared_and_hides_the_url() -> None:
    """Labels and limiter name one deployment by one digest; deployments differ; no URL text."""
    identity = keys.endpoint_identity(URL, "d1")
    assert keys.prompt_cache_key(URL, "d1").endswith(f":{identity}")
    assert keys.inflight_key(URL, "d1").endswith(f":{identity}")
    assert identity != keys.endpoint_identity(URL, "d2")
    assert identity != keys.endpoint_identity(URL)
    assert "127.0.0.1" not in keys.inflight_key(URL) + keys.prompt_cache_key(URL)


def test_key_strings_are_unchanged() -> None:
    """Keys already in production Redis keep their names (the endpoint digests aside)."""
    assert (keys.RECEIVED, keys.SPOOLED, keys.EMBEDDED) == (
        "pe:received",
        "pe:state:spooled",
        "pe:embedded",
    )
    assert keys.instance_key("1.2") == "pe:inst:1.2"
    assert keys.reference_keys("CR/CHEST")["meta"] == "pe:ref:{CR/CHEST}:meta"
    assert keys.series_key("1.2") == "pe:series:1.2"
    assert keys.health_key("dispatcher", "h:1") == "pe:health:dispatcher:h:1"
    assert keys.images_rate_key(17) == "pe:metrics:images:17"
    assert keys.wake_key(keys.inflight_key(URL)).endswith(":wake")
    assert keys.inflight_key(URL).startswith("pe:endpoint:inflight:")
