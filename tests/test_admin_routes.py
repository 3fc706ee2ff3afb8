"""The admin's study, failure and requeue routes against a real Redis: /studies,
/studies/{study_uid}, /failures, POST /requeue (and `pacs-embed requeue --instance`, and the
listener's dispatcher taking a requeued instance back from quarantine)."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from rq import Queue

from dicom_listener.dispatcher import Dispatcher, DispatchLimits
from dicom_listener.door import Doorman
from dicom_listener.spool import Spool
from pacs_embed import cli
from pacs_embed.compose import Root
from pipeline import health, keys, logs
from pipeline.admin import routes
from pipeline.admin.server import AdminServer
from pipeline.convert import ConvertOptions
from pipeline.deadletters import DeadLetters
from pipeline.jobs import PUSH_QUEUE, EmbedBatch
from pipeline.ledger import Ledger, Stage
from pipeline.metrics import EndpointMetrics
from pipeline.records import ImageRecord
from pipeline.requeue import requested_instances
from pipeline.sections import ListenerSettings
from pipeline.settings import Settings, StudySettings
from pipeline.store import EmbeddingStore
from pipeline.studies import Studies
from pipeline.verdicts import SCORED, InstanceVerdict
from tests import factory

TOKEN = "t0ken"  # noqa: S105 - the test's admin token, not a secret
SINKS = ("dicom", "webhook")
DONE, OPEN, LETTERED = "1.2.10", "1.2.20", "1.2.30"  # three studies


@pytest.fixture
def server(redis_conn: redis.Redis, tmp_path: Path) -> Iterator[AdminServer]:
    """The admin routes over the composition root's state, with two sinks configured."""
    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    settings = Settings.load(state_dir=tmp_path, admin={"token": TOKEN})
    state = dataclasses.replace(Root(settings, redis_conn).admin_state, sinks=SINKS)
    admin = AdminServer("127.0.0.1", 0, TOKEN, routes.table(state))
    admin.start_in_thread()
    yield admin
    admin.shutdown()


def call(
    server: AdminServer,
    path: str,
    *,
    body: Any = None,
    token: str | None = TOKEN,
    raw: bytes | None = None,
    method: str | None = None,
) -> tuple[int, Any]:
    """(status, JSON body); every answer here must be JSON, errors included."""
    host, port = server.address
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            status, content_type, text = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, content_type, text = exc.code, exc.headers, exc.read()
    assert content_type.get_content_type() == "application/json", (path, status)
    assert b"Traceback" not in text
    return status, json.loads(text)


def embedded(ledger: Ledger, uids: list[str]) -> None:
    with ledger.redis.pipeline() as pipe:
        ledger.mark_embedded(pipe, uids)
        pipe.execute()


def verdict(sop: str, study: str) -> InstanceVerdict:
    image = ImageRecord(
        sop_instance_uid=sop,
        study_instance_uid=study,
        series_instance_uid=f"{study}.1",
        modality="CR",
        body_part="CHEST",
    )
    return InstanceVerdict(image, "CR/CHEST", SCORED, 0.1, 0.5, 0.01, 10, 100, 1, False)


@pytest.fixture
def world(redis_conn: redis.Redis) -> Ledger:
    """DONE: complete, delivered to dicom only; OPEN: still arriving; LETTERED: complete, its
    webhook push dead-lettered. DONE has an embedded (with a verdict), a skipped and a failed
    instance."""
    ledger = Ledger(redis_conn)
    now = [1000.0]
    studies = Studies(redis_conn, StudySettings(stable_seconds=1), clock=lambda: now[0])
    done = [f"{DONE}.{n}" for n in (1, 2, 3)]
    ledger.spooled([*done, f"{LETTERED}.1"])
    studies.arrived([(DONE, uid) for uid in done] + [(LETTERED, f"{LETTERED}.1")])
    embedded(ledger, [done[0], f"{LETTERED}.1"])
    EmbeddingStore(redis_conn, ledger).put_verdicts([verdict(done[0], DONE)])
    ledger.skipped(done[1], "not an image to embed: Modality SR")
    ledger.failed(done[2], Stage.CONVERT, "unsupported Bits Allocated 7", "decoder said no")
    now[0] += 10
    assert {c.study_uid for c in studies.complete_due()} == {DONE, LETTERED}
    studies.pushed(DONE, "dicom", 1)
    DeadLetters(redis_conn).add("push-webhook-1-2-30-v1", "webhook", LETTERED, 1, "HTTP 404")
    now[0] += 1
    ledger.spooled([f"{OPEN}.1"])
    studies.arrived([(OPEN, f"{OPEN}.1")])
    return ledger


def test_studies_lists_the_most_recent_and_filters_by_state(
    server: AdminServer, world: Ledger
) -> None:
    """/studies: newest arrival first with progress; ``state`` and ``limit`` narrow it; an
    unusable parameter is a 400 naming it."""
    status, doc = call(server, "/studies")
    assert status == 200
    assert [s["study_instance_uid"] for s in doc["studies"]] == [OPEN, LETTERED, DONE]
    done = doc["studies"][2]
    assert (done["received"], done["final"], done["complete"]) == (3, 3, True)
    assert done["pushed"] == {"dicom": 1}
    assert [s["study_instance_uid"] for s in call(server, "/studies?state=open")[1]["studies"]] == [
        OPEN
    ]
    complete = call(server, "/studies?state=complete&limit=1")[1]["studies"]
    assert [s["study_instance_uid"] for s in complete] == [LETTERED]
    for query, name in (("state=closed", "state"), ("limit=0", "limit"), ("limit=x", "limit")):
        status, doc = call(server, f"/studies?{query}")
        assert (status, doc["parameter"]) == (400, name), query


def test_one_study_shows_each_instance_state_verdict_and_pushes(
    server: AdminServer, world: Ledger
) -> None:
    """/studies/{uid}: each instance's state with its reason, its images' verdicts, and where
    the study's results stand per sink (delivered, dead-lettered with the letter's id)."""
    status, doc = call(server, f"/studies/{DONE}")
    assert status == 200
    assert doc["pushes"] == {
        "dicom": {"state": "delivered", "delivered_version": 1, "dead_letter": None},
        "webhook": {"state": "pending", "delivered_version": 0, "dead_letter": None},
    }
    first, second, third = doc["instances"]
    assert (first["state"], first["reason"]) == ("embedded", None)
    [found] = first["verdicts"]
    assert (found["sop_instance_uid"], found["cohort"], found["outlier"]) == (
        f"{DONE}.1",
        "CR/CHEST",
        False,
    )
    assert (second["state"], second["reason"], second["verdicts"]) == (
        "skipped",
        "not an image to embed: Modality SR",
        [None],
    )
    assert (third["state"], third["stage"], third["reason"], third["detail"]) == (
        "failed",
        "convert",
        "unsupported Bits Allocated 7",
        "decoder said no",
    )
    assert first["push"] == {"dicom": "delivered", "webhook": "pending"}
    assert doc["instances_total"] == 3
    assert [
        i["sop_instance_uid"]
        for i in call(server, f"/studies/{DONE}?limit=1&offset=2")[1]["instances"]
    ] == [f"{DONE}.3"]
    lettered = call(server, f"/studies/{LETTERED}")[1]["pushes"]["webhook"]
    assert lettered == {
        "state": "dead_lettered",
        "delivered_version": 0,
        "dead_letter": "push-webhook-1-2-30-v1",
    }
    assert call(server, f"/studies/{OPEN}")[1]["pushes"]["dicom"]["state"] == "waiting"


def test_unknown_study_is_404_and_a_bad_one_400(server: AdminServer, world: Ledger) -> None:
    """No such study: 404 JSON that does not echo the UID; an unusable one: 400."""
    status, doc = call(server, "/studies/1.2.999")
    assert (status, doc) == (404, {"error": "no study"})
    status, doc = call(server, "/studies/1.2%C3%A9")
    assert (status, doc["parameter"]) == (400, "study_uid")
    assert call(server, f"/studies/{DONE}", token=None)[0] == 401


def test_failures_are_paged_newest_first(server: AdminServer, redis_conn: redis.Redis) -> None:
    """/failures?limit&offset walks the failures newest first; ``total`` counts them all."""
    ledger = Ledger(redis_conn)
    uids = [f"1.2.5.{n}" for n in range(5)]
    ledger.spooled(uids)
    for uid in uids:
        ledger.failed(uid, Stage.EMBED, f"reason {uid}")
        time.sleep(0.002)  # distinct times: the order is the failures'
    pages = [call(server, f"/failures?limit=2&offset={offset}")[1] for offset in (0, 2, 4, 6)]
    seen = [f["sop_instance_uid"] for page in pages for f in page["failures"]]
    assert seen == list(reversed(uids))
    assert {page["total"] for page in pages} == {5}
    assert pages[0]["failures"][0]["reason"] == "reason 1.2.5.4"
    for query, name in (("limit=0", "limit"), ("offset=-1", "offset"), ("limit=201", "limit")):
        status, doc = call(server, f"/failures?{query}")
        assert (status, doc["parameter"]) == (400, name), query
    assert call(server, "/failures", token="wrong")[0] == 401  # noqa: S106 - a wrong token


def test_requeue_a_dead_letter_and_a_study(
    server: AdminServer, world: Ledger, redis_conn: redis.Redis
) -> None:
    """POST /requeue {"dead_letter"}: back on the push queue, gone from the dead letters;
    {"study"}: the latest version pushed again to every sink; unknown ones: 404."""
    letter = "push-webhook-1-2-30-v1"
    status, doc = call(server, "/requeue", body={"dead_letter": letter})
    assert (status, doc) == (200, {"requeued": "dead_letter", "jobs": [letter]})
    assert DeadLetters(redis_conn).count() == 0
    assert letter in Queue(PUSH_QUEUE, connection=redis_conn).get_job_ids()
    assert call(server, "/requeue", body={"dead_letter": letter})[0] == 404
    status, doc = call(server, "/requeue", body={"study": DONE})
    assert (status, doc["requeued"], len(doc["jobs"])) == (200, "study", len(SINKS))
    status, doc = call(server, "/requeue", body={"study": OPEN})  # no completed version
    assert (status, doc) == (404, {"error": "nothing to requeue for that study"})


def test_requeue_an_instance_asks_the_listener(
    server: AdminServer, world: Ledger, redis_conn: redis.Redis
) -> None:
    """POST /requeue {"instance"}: a failed instance is put on the listener's list; one that
    did not fail (embedded, unknown) is 404."""
    status, doc = call(server, "/requeue", body={"instance": f"{DONE}.3"})
    assert (status, doc) == (200, {"requeued": "instance", "jobs": []})
    for uid in (f"{DONE}.1", "1.2.404"):
        status, doc = call(server, "/requeue", body={"instance": uid})
        assert (status, doc) == (404, {"error": "nothing to requeue for that instance"})
    assert requested_instances(redis_conn) == [f"{DONE}.3"]
    assert requested_instances(redis_conn) == []  # taken once


def test_requeue_refuses_what_it_cannot_use(server: AdminServer, world: Ledger) -> None:
    """Without the token any method is 401; a body that is not one known name with a usable
    value is 400 JSON (never echoed); GET is 405; a body past the limit is 413."""
    assert call(server, "/requeue", body={"study": DONE}, token=None) == (
        401,
        {"error": "Unauthorized"},
    )
    assert call(server, "/requeue", token=None)[0] == 401  # GET, no token: 401 before 405
    bad: list[bytes] = [
        b"",
        b"not json",
        b"[]",
        b'{"study": 5}',
        b'{"sop": "1.2.3"}',
        b'{"study": "1.2", "instance": "1.3"}',
        b'{"dead_letter": "a b/c"}',
        b'{"instance": "1.2\\u00e9"}',
        b"[" * 3000,
    ]
    for raw in bad:
        status, doc = call(server, "/requeue", raw=raw, method="POST")
        assert status == 400, raw
        assert doc["error"] == "bad request body" and "1.3" not in json.dumps(doc)
    status, doc = call(server, "/requeue")
    assert (status, doc) == (405, {"error": "Method Not Allowed"})
    status, doc = call(server, "/requeue", raw=b'{"study": "' + b"1" * 10_000 + b'"}')
    assert (status, doc) == (413, {"error": "Request Entity Too Large"})


def test_requeue_instance_cli(
    redis_server: str,
    redis_conn: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`pacs-embed requeue --instance UID` does what POST /requeue does; an instance that has
    not failed is named on stderr and the exit status is 1."""
    monkeypatch.setenv("PACS_EMBED_REDIS__URL", redis_server)
    monkeypatch.setenv("PACS_EMBED_STATE_DIR", str(tmp_path / "var"))
    monkeypatch.setattr(logs, "configure", lambda *_args: None)  # keep pytest's capture working
    ledger = Ledger(redis_conn)
    ledger.spooled(["1.2.7.1", "1.2.7.2"])
    ledger.failed("1.2.7.1", Stage.CONVERT, "truncated")
    assert cli.main(["requeue", "--instance", "1.2.7.1"]) == 0
    assert "requeued 1.2.7.1" in capsys.readouterr().out
    assert cli.main(["requeue", "--instance", "1.2.7.2"]) == 1
    assert "has not failed" in capsys.readouterr().err
    assert requested_instances(redis_conn) == ["1.2.7.1"]


def test_the_dispatcher_takes_a_requeued_instance_back_from_quarantine(
    redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """A requeued instance's quarantined copy goes back into the spool (its note removed), is
    converted again and leaves the failed state; one with no file anywhere is dropped."""
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    ledger = Ledger(redis_conn)
    [ds] = factory.ct_series(1, rows=64, columns=64, identical=None)
    uid = str(ds.SOPInstanceUID)
    path = spool.write(uid, factory.write(ds, tmp_path / "in.dcm").read_bytes())
    assert path is not None
    spool.quarantine(uid, path, "conversion crashed")
    ledger.spooled([uid, "1.2.8.404"])
    ledger.failed(uid, Stage.CONVERT, "conversion crashed")
    ledger.failed("1.2.8.404", Stage.CONVERT, "unreadable")
    from pipeline.requeue import requeue_instance

    requeue_instance(redis_conn, ledger, "1.2.8.404")  # its file is gone: dropped
    requeue_instance(redis_conn, ledger, uid)
    batches: list[EmbedBatch] = []
    dispatcher = Dispatcher(
        spool=spool,
        ledger=ledger,
        enqueue=lambda batch: batches.append(batch) or "job1",  # type: ignore[func-returns-value]
        queue_depth=lambda: 0,
        options=ConvertOptions(size=64),
        limits=DispatchLimits(batch_size=1, linger_seconds=0.1, in_flight=1),
        processes=1,
        requested=lambda: requested_instances(redis_conn),
    )
    dispatcher.start()
    try:
        deadline = time.monotonic() + 60
        while not batches and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        dispatcher.stop()
    assert [list(b.sop_uids) for b in batches] == [[uid]]
    assert spool.contains(uid) and list(spool.quarantine_root.iterdir()) == []
    assert ledger.counts()["failed"] == 1  # only the one without a file
    assert redis_conn.llen(keys.REQUEUE_INSTANCES) == 0


def test_status_adds_version_uptime_associations_endpoint_and_throughput(
    server: AdminServer, redis_conn: redis.Redis
) -> None:
    """/status: the installed version; uptime from the longest-running live component; each
    listener's open associations, oldest first; the endpoint's numbers; images per minute over
    the last hour."""
    now = time.time()
    health.publish(
        redis_conn,
        health.LISTENER,
        {
            "since": now - 50,
            "associations": [
                {"calling_ae": "CT2", "address": "10.0.0.2", "since": now - 5, "instances": 3},
                {"calling_ae": "CT1", "address": "10.0.0.1", "since": now - 9, "instances": 7},
            ],
        },
    )
    health.publish(redis_conn, health.WORKER, {"since": now - 120, "state": "idle", "job": None})
    metrics = EndpointMetrics(redis_conn)
    metrics.attempt(status="200", seconds=0.2, bytes_sent=10, images=4)
    metrics.attempt(status="429", seconds=0.01, bytes_sent=10, images=0)
    metrics.retry("429")
    status, doc = call(server, "/status")
    assert status == 200
    assert doc["version"] == version("pacs-embed")
    assert 120 <= doc["uptime_seconds"] < 130
    assert [(a["calling_ae"], a["instances"]) for a in doc["associations"]] == [
        ("CT1", 7),
        ("CT2", 3),
    ]
    assert doc["associations"][0]["listener"] == health.process_name()
    endpoint = doc["endpoint"]
    assert (endpoint["requests"], endpoint["errors"], endpoint["error_rate"]) == (2, 1, 0.5)
    assert endpoint["by_status"] == {"200": 1, "429": 1} and endpoint["retries"] == 1
    assert endpoint["latency_seconds"]["p50"] == 0.05 and endpoint["latency_seconds"]["p95"] == 0.25
    assert "in_flight" in endpoint and "in_flight_limit" in endpoint
    images = doc["throughput"]["images"]
    assert len(images) == 60 and images[-1] + images[-2] == 4  # this minute (or the last)


def test_the_door_counts_instances_per_held_association() -> None:
    """The listener's report lists each association holding a slot: calling AE, address,
    since, instances stored; a released one is gone."""
    door = Doorman(ListenerSettings(max_associations=2))

    class Association:  # hashed by identity, as pynetdicom's
        def __init__(self, title: bytes, address: str) -> None:
            request = SimpleNamespace(calling_ae_title=title)
            self.requestor = SimpleNamespace(primitive=request, address=address)

    def association(title: bytes, address: str) -> Any:
        return Association(title, address)

    first, second = association(b"CT1 ", "10.0.0.1"), association(b"MR\x07", "10.0.0.2")
    assert door.claim(first)[0] and door.claim(second)[0]
    for assoc in (first, first, second):
        door.stored(assoc)
    held = door.held()
    assert [(h["calling_ae"], h["address"], h["instances"]) for h in held] == [
        ("CT1", "10.0.0.1", 2),
        ("MR?", "10.0.0.2", 1),
    ]
    door.release(first)
    door.stored(first)  # after its end: nothing to count
    assert [h["calling_ae"] for h in door.held()] == ["MR?"]
