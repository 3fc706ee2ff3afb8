"""Pushing study versions' results (workers/push.py, workers/jobs.py, workers/completer.py,
pipeline/requeue.py, `pacs-embed requeue`) against a real Redis, a real rq worker and real
DICOM files in a real spool. Only the sinks are fakes: they record what they are handed and
refuse on demand, as the DICOM, DICOMweb and webhook sinks do."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
import redis
from rq import Queue, SimpleWorker

from dicom_listener.retention import Retention
from dicom_listener.spool import Spool
from pacs_embed import cli
from pacs_embed.compose import Root
from pipeline import keys, logs
from pipeline.deadletters import DeadLetters
from pipeline.embed.contract import EMBEDDING_DIM
from pipeline.errors import PermanentPushError, TransientPushError
from pipeline.jobs import PUSH_QUEUE, enqueue_push, push_job_id
from pipeline.ledger import Ledger
from pipeline.records import ImageRecord
from pipeline.requeue import NothingToRequeue, requeue_study
from pipeline.results import Algorithm, ResultIdentity
from pipeline.sections import StudySettings
from pipeline.settings import Settings
from pipeline.sinks.webhook import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, WebhookSink, verify
from pipeline.store import EmbeddingStore
from pipeline.studies import Studies
from pipeline.verdicts import SCORED, InstanceVerdict
from tests import factory
from tests.test_studies import Clock
from workers import runtime
from workers.completer import Completer
from workers.push import DICOM, WEBHOOK, Outcome, PushService, idempotency_key

STABLE = 5.0
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
SECRET = "push-test-secret"  # noqa: S105 - the test's own receiver
PATIENT_VALUES = (
    factory.PATIENT_NAME,
    factory.PATIENT_ID,
    factory.PATIENT_BIRTH_DATE,
    factory.ACCESSION_NUMBER,
    "Doe",
    "Jane",
)


class Killed(BaseException):
    """The process died here (kill -9): nothing after it runs, nothing catches it."""


class DatasetSink:
    """A DICOM / DICOMweb sink: keeps every send; raises what ``refuse`` holds, or — with
    ``die_after_send`` — takes the datasets and then "dies" before push() can record them."""

    def __init__(self) -> None:
        self.calls: list[list[pydicom.Dataset]] = []
        self.refuse: Exception | None = None
        self.die_after_send = False

    def send(self, datasets: Sequence[pydicom.Dataset]) -> dict[str, int]:
        self.calls.append(list(datasets))
        if self.refuse is not None:
            raise self.refuse
        if self.die_after_send:
            self.die_after_send = False
            raise Killed
        return {"sent": len(datasets)}


class BodySink:
    """A webhook sink: keeps every (body, idempotency key)."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, str]] = []
        self.refuse: Exception | None = None
        self.die_after_send = False

    def send(self, body: bytes, idempotency_key: str) -> None:
        self.calls.append((body, idempotency_key))
        if self.refuse is not None:
            raise self.refuse
        if self.die_after_send:
            self.die_after_send = False
            raise Killed


class World:
    """The push service's real surroundings, on one study."""

    def __init__(
        self,
        conn: redis.Redis,
        tmp_path: Path,
        webhook: Any | None = None,
        delivered: Callable[[str, int], None] | None = None,
        **service: Any,
    ) -> None:
        self.redis = conn
        self.clock = Clock()
        self.spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
        self.ledger = Ledger(conn)
        self.store = EmbeddingStore(conn, self.ledger)
        self.studies = Studies(conn, StudySettings(stable_seconds=STABLE), clock=self.clock)
        self.dead_letters = DeadLetters(conn)
        self.retention = Retention(self.spool, conn, hours=1, low_free_bytes=0, clock=self.clock)
        self.dicom = DatasetSink()
        self.webhook = BodySink()
        self.delivered: list[tuple[str, int]] = []
        self.service = PushService(
            connection=conn,
            studies=self.studies,
            dead_letters=self.dead_letters,
            ledger=self.ledger,
            store=self.store,
            read_header=self.spool.header,
            datasets={DICOM: self.dicom},
            webhook=self.webhook if webhook is None else webhook,
            algorithm=Algorithm(model_version="x", software_version="y"),
            delivered=self._delivered if delivered is None else delivered,
            clock=self.clock,
            **service,
        )
        self.queue = Queue(PUSH_QUEUE, connection=conn)
        self.study = factory.new_uid()
        self.series = factory.new_uid()
        self.sources: list[pydicom.Dataset] = []

    def _delivered(self, study: str, version: int) -> None:
        self.delivered.append((study, version))
        self.retention.eligible(self.studies.members(study))

    def receive(self, count: int, *, flagged: Sequence[int] = ()) -> list[pydicom.Dataset]:
        """``count`` CT slices spooled, arrived, converted and embedded with a verdict each
        (those at the ``flagged`` positions outliers), as the listener and a worker leave them."""
        new = []
        for i in range(count):
            ds = factory.ct_slice(
                study_uid=self.study,
                series_uid=self.series,
                instance_number=len(self.sources) + 1,
                rows=16,
                columns=16,
            )
            sop = str(ds.SOPInstanceUID)
            factory.write(ds, self.spool.path_for(sop))
            self.ledger.spooled([sop])
            self.studies.arrived([(self.study, sop)])
            record = ImageRecord(
                sop_instance_uid=sop,
                study_instance_uid=self.study,
                series_instance_uid=self.series,
                sop_class_uid=str(ds.SOPClassUID),
                modality="CT",
                body_part="CHEST",
            )
            self.ledger.converting([sop])
            self.ledger.converted(sop, record.instance_fields(), frames=[0])
            self.ledger.queued([sop], "embed-job")
            outlier = i in flagged
            verdict = InstanceVerdict(
                image=record,
                cohort="CT/CHEST",
                state=SCORED,
                score=0.9 if outlier else 0.2,
                p_value=0.004 if outlier else 0.4,
                alpha=0.01,
                k=5,
                reference_size=200,
                reference_version=1,
                outlier=outlier,
            )
            vector = np.zeros((1, EMBEDDING_DIM), dtype=np.float32)
            vector[0, len(self.sources) % EMBEDDING_DIM] = 1.0
            self.store.save([record], vector, [verdict])
            self.sources.append(ds)
            new.append(ds)
        return new

    def complete(self) -> int:
        """Let the stable time pass; the version that completes."""
        self.clock.advance(STABLE)
        [done] = self.studies.complete_due()
        return done.version

    def work(self) -> None:
        """Run the push queue dry in this process, as the push service's worker does."""
        runtime.bind_pusher(self.service)
        worker = SimpleWorker([self.queue], connection=self.redis)
        worker.work(burst=True, logging_level="WARNING")

    def counts(self) -> dict[str, int]:
        raw = self.redis.hgetall(keys.PUSH_COUNTS)
        return {keys.text(k): int(v) for k, v in raw.items()}


@pytest.fixture(autouse=True)
def _unbound_pusher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test binds, the next one starts without it."""
    monkeypatch.setattr(runtime, "_pusher", None)


@pytest.fixture
def world(redis_conn: redis.Redis, tmp_path: Path) -> World:
    return World(redis_conn, tmp_path)


@pytest.fixture
def cli_env(redis_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`pacs-embed` in-process on the test Redis, with a DICOM node and a webhook configured
    (requeue --study pushes to the configured sinks; nothing is ever sent to these addresses)."""
    monkeypatch.setenv("PACS_EMBED_REDIS__URL", redis_server)
    monkeypatch.setenv("PACS_EMBED_STATE_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("PACS_EMBED_SINKS__DICOM__HOST", "127.0.0.1")
    monkeypatch.setenv("PACS_EMBED_SINKS__DICOM__AE_TITLE", "PACS")
    monkeypatch.setenv("PACS_EMBED_SINKS__WEBHOOK__URL", "http://127.0.0.1:9/hook")
    monkeypatch.setenv("PACS_EMBED_SINKS__WEBHOOK__SECRET", SECRET)
    # cli.main configures structlog globally onto pytest's captured stderr; not under test here.
    monkeypatch.setattr(logs, "configure", lambda *_args: None)
    yield


def referenced_sops(ds: pydicom.Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in ``ds``."""
    found: set[str] = set()
    for element in ds.iterall():
        if element.keyword == "ReferencedSOPInstanceUID":
            found.add(str(element.value))
    return found


def uids(ds: pydicom.Dataset) -> tuple[str, str, str]:
    return str(ds.SOPClassUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


# -- one push ----------------------------------------------------------------------------------


def test_sr_only_when_nothing_is_flagged(world: World) -> None:
    sources = world.receive(3)
    version = world.complete()
    assert world.service.push(DICOM, world.study, version) is Outcome.SENT
    [sent] = world.dicom.calls
    [sr] = sent
    identity = ResultIdentity(world.study, 1)
    assert uids(sr) == (SR_CLASS, identity.sr.series_instance_uid, identity.sr.sop_instance_uid)
    assert str(sr.StudyInstanceUID) == world.study
    assert {str(ds.SOPInstanceUID) for ds in sources} <= referenced_sops(sr)
    assert world.studies.pushed_version(world.study, DICOM) == 1
    assert world.studies.pushed_version(world.study, WEBHOOK) == 0
    assert world.delivered == []  # the webhook has not had it yet


def test_kos_of_the_flagged_image_beside_the_sr(world: World) -> None:
    sources = world.receive(3, flagged=[1])
    world.service.push(DICOM, world.study, world.complete())
    [[sr, kos]] = world.dicom.calls
    assert uids(sr)[0] == SR_CLASS
    identity = ResultIdentity(world.study, 1)
    assert uids(kos) == (
        KOS_CLASS,
        identity.kos.series_instance_uid,
        identity.kos.sop_instance_uid,
    )
    assert referenced_sops(kos) == {str(sources[1].SOPInstanceUID)}


def test_webhook_gets_a_signed_body_with_its_idempotency_key(
    redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """Through the real WebhookSink over an in-memory transport: the signature verifies with
    the shared secret, and the body names the study version, its images and its SR."""
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(204)

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        hook = WebhookSink("http://127.0.0.1:9/hook", SECRET, client)
        world = World(redis_conn, tmp_path, webhook=hook)
        sources = world.receive(2, flagged=[0])
        version = world.complete()
        assert world.service.push(WEBHOOK, world.study, version) is Outcome.SENT
    [request] = requests
    body = request.content
    assert verify(body, SECRET.encode(), request.headers[SIGNATURE_HEADER])
    assert request.headers[IDEMPOTENCY_HEADER] == idempotency_key(world.study, 1)
    doc = json.loads(body)
    assert doc["idempotency_key"] == idempotency_key(world.study, 1)
    assert (doc["study_instance_uid"], doc["version"], doc["supersedes"]) == (world.study, 1, None)
    assert doc["instances"] == {"received": 2, "final": 2}
    assert sorted(image["sop_instance_uid"] for image in doc["images"]) == sorted(
        str(ds.SOPInstanceUID) for ds in sources
    )
    assert [image["outlier"] for image in doc["images"] if image["outlier"]] == [True]
    assert doc["sr"]["sop_instance_uid"] == ResultIdentity(world.study, 1).sr.sop_instance_uid
    assert world.studies.pushed_version(world.study, WEBHOOK) == 1


def test_delivered_to_every_sink_makes_the_instances_eligible(world: World) -> None:
    world.receive(2)
    version = world.complete()
    world.service.push(DICOM, world.study, version)
    assert world.retention.pending() == 0
    world.service.push(WEBHOOK, world.study, version)
    assert world.delivered == [(world.study, 1)]
    assert world.retention.pending() == 2


def test_webhook_body_carries_no_patient_data(redis_conn: redis.Redis, tmp_path: Path) -> None:
    """The factory's patient name, ID, birth date and accession are in every source file and
    copied into the SR; none of them is anywhere in the webhook's bytes (vectors included)."""
    world = World(redis_conn, tmp_path, include_vectors=True)
    world.receive(3, flagged=[2])
    version = world.complete()
    world.service.push(DICOM, world.study, version)
    world.service.push(WEBHOOK, world.study, version)
    [[sr, _kos]] = world.dicom.calls
    assert str(sr.PatientID) == factory.PATIENT_ID  # the SR is filed with the patient's study
    [(body, _key)] = world.webhook.calls
    assert b'"vector"' in body
    for value in PATIENT_VALUES:
        assert value.encode() not in body, value
    lowered = body.lower()
    for name in (b"patientname", b"patient_name", b"patientid", b"birth", b"accession"):
        assert name not in lowered


# -- exactly once ------------------------------------------------------------------------------


def test_redo_of_a_delivered_push_is_already(world: World) -> None:
    world.receive(2)
    version = world.complete()
    assert world.service.push(DICOM, world.study, version) is Outcome.SENT
    assert world.service.push(WEBHOOK, world.study, version) is Outcome.SENT
    assert world.service.push(DICOM, world.study, version) is Outcome.ALREADY
    assert world.service.push(WEBHOOK, world.study, version) is Outcome.ALREADY
    assert len(world.dicom.calls) == 1
    assert len(world.webhook.calls) == 1
    assert world.counts() == {
        "dicom|sent": 1,
        "webhook|sent": 1,
        "dicom|already": 1,
        "webhook|already": 1,
    }


def test_killed_between_send_and_record_resends_the_same_objects(world: World) -> None:
    """The sink took it, the process died before ``pushed`` was recorded: the redo sends again,
    under the same SR/KOS SOP Instance UIDs and the same webhook idempotency key (so the PACS
    and the receiver each keep one copy)."""
    world.receive(3, flagged=[0])
    version = world.complete()
    world.dicom.die_after_send = True
    world.webhook.die_after_send = True
    with pytest.raises(Killed):
        world.service.push(DICOM, world.study, version)
    with pytest.raises(Killed):
        world.service.push(WEBHOOK, world.study, version)
    assert world.studies.pushed_version(world.study, DICOM) == 0
    assert world.studies.pushed_version(world.study, WEBHOOK) == 0

    assert world.service.push(DICOM, world.study, version) is Outcome.SENT
    assert world.service.push(WEBHOOK, world.study, version) is Outcome.SENT
    first, again = world.dicom.calls
    assert [uids(ds) for ds in first] == [uids(ds) for ds in again]
    assert len(first) == 2  # SR and KOS, both the same instances
    (body1, key1), (body2, key2) = world.webhook.calls
    assert key1 == key2 == idempotency_key(world.study, 1)
    assert body1 == body2
    assert world.studies.pushed_version(world.study, DICOM) == 1
    assert world.service.push(DICOM, world.study, version) is Outcome.ALREADY


def test_superseded_version_is_skipped_and_the_newer_carries_everything(world: World) -> None:
    first = world.receive(2)
    assert world.complete() == 1
    late = world.receive(1)  # a late series: version 2
    assert world.complete() == 2
    assert world.service.push(DICOM, world.study, 1) is Outcome.SUPERSEDED
    assert world.service.push(WEBHOOK, world.study, 1) is Outcome.SUPERSEDED
    assert world.dicom.calls == [] and world.webhook.calls == []
    assert world.service.push(DICOM, world.study, 2) is Outcome.SENT
    [[sr]] = world.dicom.calls
    assert str(sr.SOPInstanceUID) == ResultIdentity(world.study, 2).sr.sop_instance_uid
    assert {str(ds.SOPInstanceUID) for ds in first + late} <= referenced_sops(sr)
    # Version 1 never reached the PACS: version 2 names no predecessor there.
    assert "PredecessorDocumentsSequence" not in sr
    assert world.service.push(WEBHOOK, world.study, 2) is Outcome.SENT
    [(body, _key)] = world.webhook.calls
    doc = json.loads(body)
    assert (doc["version"], doc["supersedes"], len(doc["images"])) == (2, 1, 3)


def test_version_2_after_retention_deleted_version_1_sources(world: World) -> None:
    """Version 1 was delivered everywhere and retention deleted its files; a late instance makes
    version 2, whose SR still references the deleted instances (stand-ins from their records)
    and names version 1's SR as its predecessor."""
    first = world.receive(2)
    version = world.complete()
    world.service.push(DICOM, world.study, version)
    world.service.push(WEBHOOK, world.study, version)
    world.clock.advance(3600)
    assert world.retention.clean() == 2
    assert all(world.spool.header(str(ds.SOPInstanceUID)) is None for ds in first)

    late = world.receive(1)
    assert world.complete() == 2
    assert world.service.push(DICOM, world.study, 2) is Outcome.SENT
    [_v1, [sr]] = world.dicom.calls
    assert {str(ds.SOPInstanceUID) for ds in first + late} <= referenced_sops(sr)
    [predecessor] = sr.PredecessorDocumentsSequence
    assert referenced_sops(predecessor) == {ResultIdentity(world.study, 1).sr.sop_instance_uid}
    assert str(sr.PatientID) == factory.PATIENT_ID  # from the file still in the spool


def test_forced_repush_of_version_2_keeps_its_predecessor(world: World) -> None:
    """`requeue --study` re-sends version 2 under the same SR SOP Instance UID: it must be the
    same document, still naming version 1's SR as its predecessor."""
    world.receive(1)
    world.service.push(DICOM, world.study, world.complete())
    world.receive(1)
    world.service.push(DICOM, world.study, world.complete())
    assert world.service.push(DICOM, world.study, 2, force=True) is Outcome.SENT
    _v1, [sr], [again] = world.dicom.calls
    assert uids(sr) == uids(again)
    assert "PredecessorDocumentsSequence" in sr
    assert "PredecessorDocumentsSequence" in again


def test_delivering_version_1_leaves_a_version_2_arrival_in_the_spool(
    redis_conn: redis.Redis, tmp_path: Path, cli_env: None
) -> None:
    """Version 1's push lands after a new instance opened version 2 (spooled, not converted
    yet): that file must not become eligible for deletion with version 1's instances — none
    is, until the newest version is delivered. The delivery callback is the daemon's own
    (pacs_embed/compose.py)."""
    with Root(Settings.load(None), connection=redis_conn) as root:
        world = World(redis_conn, tmp_path, delivered=root.push_service.delivered)
    world.receive(2)
    version = world.complete()
    late = factory.ct_slice(study_uid=world.study, series_uid=world.series, instance_number=9)
    late_uid = str(late.SOPInstanceUID)
    factory.write(late, world.spool.path_for(late_uid))
    world.ledger.spooled([late_uid])
    world.studies.arrived([(world.study, late_uid)])  # version 2 opens
    world.service.push(DICOM, world.study, version)
    world.service.push(WEBHOOK, world.study, version)
    assert world.redis.zcard(keys.RETENTION) == 0


# -- through rq: retries, dead letters, requeue --------------------------------------------------


def test_transient_refusal_is_retried_then_dead_lettered(world: World) -> None:
    world.receive(1)
    version = world.complete()
    world.dicom.refuse = TransientPushError("association rejected by the peer (busy)")
    job_id = enqueue_push(world.queue, DICOM, world.study, version, retry_intervals=[0, 0])
    assert job_id == push_job_id(DICOM, world.study, 1)
    world.work()
    assert len(world.dicom.calls) == 3  # the first try and both retries
    [letter] = world.dead_letters.recent()
    assert (letter.id, letter.sink, letter.study_instance_uid, letter.version) == (
        job_id,
        DICOM,
        world.study,
        1,
    )
    assert letter.reason == "association rejected by the peer (busy) (every retry failed)"
    assert world.studies.pushed_version(world.study, DICOM) == 0
    assert world.counts() == {"dicom|dead_lettered": 1}


def test_permanent_refusal_is_dead_lettered_at_once(world: World) -> None:
    world.receive(1)
    version = world.complete()
    world.dicom.refuse = PermanentPushError("C-STORE answered 0xA900")
    enqueue_push(world.queue, DICOM, world.study, version, retry_intervals=[0, 0])
    world.work()
    assert len(world.dicom.calls) == 1
    [letter] = world.dead_letters.recent()
    assert letter.reason == "C-STORE answered 0xA900"
    assert world.dead_letters.count() == 1


def test_requeue_of_a_dead_letter_delivers_it(
    world: World, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    world.receive(2)
    version = world.complete()
    world.webhook.refuse = PermanentPushError("webhook answered HTTP 404")
    enqueue_push(world.queue, WEBHOOK, world.study, version, retry_intervals=[0])
    world.work()
    [letter] = world.dead_letters.recent()
    world.webhook.refuse = None  # the operator fixed the receiver
    capsys.readouterr()  # what the worker logged
    assert cli.main(["requeue", letter.id]) == 0
    assert capsys.readouterr().out.strip() == f"requeued {letter.id}: {letter.id}"
    assert world.dead_letters.count() == 0
    world.work()
    assert len(world.webhook.calls) == 2
    assert world.studies.pushed_version(world.study, WEBHOOK) == 1
    assert world.dead_letters.count() == 0
    # Unknown now: it was taken.
    assert cli.main(["requeue", letter.id]) == 1
    assert "no dead letter" in capsys.readouterr().err


def test_requeue_study_pushes_the_latest_version_again_with_force(
    world: World, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    world.receive(2, flagged=[1])
    version = world.complete()
    world.service.push(DICOM, world.study, version)
    world.service.push(WEBHOOK, world.study, version)
    capsys.readouterr()
    assert cli.main(["requeue", "--study", world.study]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"requeued {world.study}: {push_job_id(DICOM, world.study, 1)}",
        f"requeued {world.study}: {push_job_id(WEBHOOK, world.study, 1)}",
    ]
    world.work()
    first, again = world.dicom.calls
    assert [uids(ds) for ds in first] == [uids(ds) for ds in again]
    (_, key1), (_, key2) = world.webhook.calls
    assert key1 == key2
    assert world.counts()["dicom|sent"] == 2


def test_requeue_of_unknown_study_or_letter_fails(
    world: World, cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    world.receive(1)  # arrived, not complete: nothing to re-push yet
    capsys.readouterr()
    with pytest.raises(NothingToRequeue):
        requeue_study(world.redis, world.studies, [DICOM], world.study)
    assert cli.main(["requeue", "--study", world.study, "no-such-letter"]) == 1
    err = capsys.readouterr().err
    assert "has no completed version" in err and "no dead letter 'no-such-letter'" in err
    assert cli.main(["requeue"]) == 2


# -- the completer ---------------------------------------------------------------------------


def test_completer_turns_a_completed_version_into_one_push_job_per_sink(world: World) -> None:
    world.receive(2)
    completer = Completer(world.studies, world.queue, world.service.sinks)
    world.clock.advance(STABLE)
    completer.tick()
    assert sorted(world.queue.job_ids) == sorted(
        [push_job_id(DICOM, world.study, 1), push_job_id(WEBHOOK, world.study, 1)]
    )
    assert world.studies.outbox() == []
    completer.tick()  # nothing new: nothing enqueued again
    assert len(world.queue.job_ids) == 2
    world.work()
    assert len(world.dicom.calls) == len(world.webhook.calls) == 1
    assert world.delivered == [(world.study, 1)]


def test_completer_without_sinks_calls_final_once(world: World) -> None:
    world.receive(1)
    finals: list[tuple[str, int]] = []
    completer = Completer(
        world.studies,
        world.queue,
        [],
        final=lambda study, version: finals.append((study, version)),
    )
    world.clock.advance(STABLE)
    completer.tick()
    completer.tick()
    assert finals == [(world.study, 1)]
    assert world.queue.count == 0
    assert world.studies.outbox() == []
