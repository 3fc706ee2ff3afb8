"""Every stage on /metrics: C-STOREs, bytes, associations, spool, conversions, queues, flags,
pushes and study completion latency, fleet-wide from Redis (pipeline/stage_metrics.py).

The end-to-end test drives a real `pacs-embed run` (its listener, workers, push service and
admin are separate processes, so every number crosses Redis) and parses the exposition with
prometheus-client's own parser.
"""

from __future__ import annotations

import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from redis.backoff import NoBackoff
from redis.retry import Retry
from structlog.testing import capture_logs

from pipeline import health
from pipeline.intake import Event, IntakeLog, Kind
from pipeline.keys import PUSH_COUNTS
from pipeline.metrics import render
from pipeline.stage_metrics import ListenerMetrics, StageCollector, StageMetrics
from tests import hostile
from tests.conftest import free_port
from tests.daemon import AE_TITLE, Daemon
from tests.sinks_peers import HTTPReceiver, Recorded

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: Every family the stages add: name as the parser gives it (counters without ``_total``) -> type.
STAGE_FAMILIES = {
    "pacs_embed_cstore": "counter",
    "pacs_embed_received_bytes": "counter",
    "pacs_embed_associations": "counter",
    "pacs_embed_associations_open": "gauge",
    "pacs_embed_spool_backlog_instances": "gauge",
    "pacs_embed_spool_free_bytes": "gauge",
    "pacs_embed_spool_write_seconds": "histogram",
    "pacs_embed_conversions": "counter",
    "pacs_embed_conversion_seconds": "histogram",
    "pacs_embed_queue_jobs": "gauge",
    "pacs_embed_flags": "counter",
    "pacs_embed_pushes": "counter",
    "pacs_embed_dead_letters": "gauge",
    "pacs_embed_study_completion_seconds": "histogram",
}


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, every sample keyed by (name, sorted labels)). A counter's samples
    must all be ``<name>_total``."""
    families = list(text_string_to_metric_families(text))
    types = {family.name: family.type for family in families}
    for family in families:
        if family.type == "counter":
            assert {s.name for s in family.samples} <= {f"{family.name}_total"}, family.name
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
    }
    return types, samples


# -- units: the writers and the collector against a real Redis ---------------------------------
def test_listener_counts_stay_in_memory_until_flushed(redis_conn: redis.Redis) -> None:
    """The C-STORE path never touches Redis: counts appear with the flush, summed."""
    metrics = ListenerMetrics(redis_conn)
    metrics.stored(0x0000, 1000)
    metrics.stored(0x0000, 500)
    metrics.stored(0xA900, 300)
    metrics.accepted()
    metrics.converted("converted", 0.03)
    metrics.converted("failed", 200.0)
    collector = StageCollector(redis_conn, Path("/nonexistent/spool"))
    _, before = parse(render(collector).decode())
    assert ("pacs_embed_cstore_total", (("status", "0x0000"),)) not in before
    metrics.flush()
    metrics.flush()  # nothing new: nothing written twice
    types, got = parse(render(collector).decode())
    assert got[("pacs_embed_cstore_total", (("status", "0x0000"),))] == 2
    assert got[("pacs_embed_cstore_total", (("status", "0xA900"),))] == 1
    assert got[("pacs_embed_received_bytes_total", ())] == 1800
    assert got[("pacs_embed_associations_total", (("outcome", "accepted"),))] == 1
    assert got[("pacs_embed_conversions_total", (("outcome", "converted"),))] == 1
    assert got[("pacs_embed_conversions_total", (("outcome", "failed"),))] == 1
    assert got[("pacs_embed_conversions_total", (("outcome", "skipped"),))] == 0
    bucket = "pacs_embed_conversion_seconds_bucket"
    assert got[(bucket, (("le", "0.05"),))] == 1
    assert got[(bucket, (("le", "120.0"),))] == 1
    assert got[(bucket, (("le", "+Inf"),))] == 2
    assert got[("pacs_embed_conversion_seconds_sum", ())] == pytest.approx(200.03)
    assert "pacs_embed_spool_free_bytes" not in types  # no spool dir: no made-up gauge


def test_collector_reads_reports_intake_pushes_and_disk(
    redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """Gauges from the live reports and the disk; rejections from the intake log; pushes by
    sink and outcome; workers' flags and completion latency."""
    health.publish(redis_conn, health.LISTENER, {"associations": [{"calling_ae": "A"}] * 2})
    health.publish(redis_conn, health.DISPATCHER, {"ok": True, "backlog": 7})
    IntakeLog(redis_conn).record(Event(Kind.ASSOCIATION_REJECTED, "called AE title not recognised"))
    IntakeLog(redis_conn).record(Event(Kind.REFUSED, "x", status="0xA900"))  # not an association
    redis_conn.hincrby(PUSH_COUNTS, "webhook|sent", 3)
    redis_conn.hincrby(PUSH_COUNTS, "dicom|dead_lettered", 1)
    workers = StageMetrics(redis_conn)
    workers.flagged({"outlier": 2, "label_mismatch": 0})
    workers.study_completed(4.0)
    workers.study_completed(40.0)
    types, got = parse(render(StageCollector(redis_conn, tmp_path)).decode())
    assert {name: types.get(name) for name in STAGE_FAMILIES} == STAGE_FAMILIES
    assert got[("pacs_embed_associations_open", ())] == 2
    assert got[("pacs_embed_spool_backlog_instances", ())] == 7
    assert got[("pacs_embed_spool_free_bytes", ())] == shutil.disk_usage(tmp_path).free
    assert got[("pacs_embed_associations_total", (("outcome", "rejected"),))] == 1
    assert got[("pacs_embed_associations_total", (("outcome", "accepted"),))] == 0
    assert got[("pacs_embed_pushes_total", (("outcome", "sent"), ("sink", "webhook")))] == 3
    assert got[("pacs_embed_pushes_total", (("outcome", "dead_lettered"), ("sink", "dicom")))] == 1
    assert got[("pacs_embed_flags_total", (("kind", "outlier"),))] == 2
    assert got[("pacs_embed_flags_total", (("kind", "label_mismatch"),))] == 0
    assert got[("pacs_embed_queue_jobs", (("queue", "embed"), ("state", "queued")))] == 0
    assert got[("pacs_embed_study_completion_seconds_count", ())] == 2
    assert got[("pacs_embed_study_completion_seconds_bucket", (("le", "5.0"),))] == 1
    assert got[("pacs_embed_study_completion_seconds_sum", ())] == 44.0


def test_a_redis_outage_keeps_the_tally_and_fails_no_caller() -> None:
    """Flushing with Redis down logs at debug and raises nothing; the counts wait for the next
    flush rather than vanish."""
    dead = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    metrics = ListenerMetrics(dead)
    metrics.stored(0x0000, 10)
    with capture_logs() as logs:
        metrics.flush()
        StageMetrics(dead).flagged({"outlier": 1})
        StageMetrics(dead).study_completed(1.0)
    dead.close()
    assert [(e["event"], e["log_level"]) for e in logs] == [("metrics.write_failed", "debug")] * 3
    assert metrics.tally._counts == {"cstore|status=0x0000": 1, "received_bytes": 10}


# -- end to end: `pacs-embed run` -------------------------------------------------------------
class Pushes:
    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def answer(self, _request: Recorded) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            self.count += 1
        return 204, {}, b""


@pytest.fixture
def world(daemon: Daemon) -> Iterator[tuple[Daemon, Pushes]]:
    pushes = Pushes()
    with HTTPReceiver(pushes.answer) as receiver:
        daemon.env.update(
            {
                "PACS_EMBED_STUDY__STABLE_SECONDS": "1",
                "PACS_EMBED_SINKS__WEBHOOK__URL": receiver.url,
                "PACS_EMBED_SINKS__WEBHOOK__SECRET": "s",
            }
        )
        yield daemon, pushes


def scrape(daemon: Daemon) -> tuple[dict[str, str], Samples]:
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.admin_port}/metrics")
    request.add_header("Authorization", f"Bearer {daemon.token()}")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        return parse(response.read().decode())


def value(daemon: Daemon, name: str, **labels: str) -> float:
    return scrape(daemon)[1].get((name, tuple(sorted(labels.items()))), 0.0)


def mismatch() -> hostile.Case:
    """A CT command whose data set says MR: refused 0xA900."""
    return next(
        case
        for case in hostile.dataset_uids()
        if case.name == "ds-uid/SOP Class UID is MR in the data set"
    )


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("echoscu") is None, reason="DCMTK not installed")
def test_every_stage_on_metrics(world: tuple[Daemon, Pushes]) -> None:
    daemon, pushes = world
    daemon.start()
    accepted = "pacs_embed_associations_total"
    # start()'s C-ECHO association, once the listener's counts are flushed (every 2 s)
    daemon.wait_for(lambda: value(daemon, accepted, outcome="accepted") >= 1, 30, "the echo")
    _, before = scrape(daemon)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # One association held open while the listener reports it; one rejected (wrong called AE).
    ae = hostile.scu()
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AE_TITLE)
    assert held.is_established
    try:
        daemon.wait_for(
            lambda: value(daemon, "pacs_embed_associations_open") == 1, 30, "an open association"
        )
    finally:
        held.release()
    refused = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="NOT_US")
    assert refused.is_rejected

    # Three valid CTs (three studies) and one refused, on one association.
    cases = [hostile.control(f"metrics/{n}") for n in range(3)] + [mismatch()]
    outcomes = hostile.send(daemon.dicom_port, cases)
    assert [o.status for o in outcomes] == [0x0000] * 3 + [0xA900], outcomes
    sent_bytes = sum(len(case.data) for case in cases)

    daemon.wait_for(lambda: pushes.count >= 3, 90, "three studies pushed")
    completion = "pacs_embed_study_completion_seconds_count"
    daemon.wait_for(lambda: value(daemon, completion) >= 3, 30, "three completions timed")
    daemon.wait_for(
        lambda: value(daemon, "pacs_embed_associations_open") == 0, 30, "associations closed"
    )
    conversions = "pacs_embed_conversion_seconds_count"  # the dispatcher's, flushed on its own
    daemon.wait_for(lambda: value(daemon, conversions) >= 3, 30, "three conversions counted")
    types, after = scrape(daemon)

    # every family, with its type; Prometheus conventions (and parse(): counters are _total)
    assert {name: types.get(name) for name in STAGE_FAMILIES} == STAGE_FAMILIES
    for name, kind in types.items():
        assert name.startswith("pacs_embed_"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
        if "bytes" in name or "seconds" in name:
            assert name.endswith(("_bytes", "_seconds")), name  # the unit last
    for endpoint in ("requests", "request_bytes", "images", "retries"):
        assert types[f"pacs_embed_endpoint_{endpoint}"] == "counter"
    assert types["pacs_embed_endpoint_request_seconds"] == "histogram"

    # C-STOREs by status, exactly what was sent; bytes of every data set received
    assert grew("pacs_embed_cstore_total", status="0x0000") == 3
    assert grew("pacs_embed_cstore_total", status="0xA900") == 1
    assert grew("pacs_embed_received_bytes_total") == sent_bytes
    # associations: the held one and the C-STOREs' accepted, the wrong AE title rejected
    assert grew(accepted, outcome="accepted") == 2
    assert grew(accepted, outcome="rejected") == 1
    # spool: nothing waiting once pushed; free disk as the admin sees it
    assert after[("pacs_embed_spool_backlog_instances", ())] == 0
    assert after[("pacs_embed_spool_free_bytes", ())] > 0
    # conversions: the three spooled ones (the refused one never reached the spool)
    assert grew("pacs_embed_conversions_total", outcome="converted") == 3
    assert grew("pacs_embed_conversions_total", outcome="failed") == 0
    assert grew("pacs_embed_conversion_seconds_count") == 3
    assert after[("pacs_embed_conversion_seconds_sum", ())] > 0
    # each spooled instance's durable write timed (the refused one was never written)
    assert grew("pacs_embed_spool_write_seconds_count") == 3
    assert after[("pacs_embed_spool_write_seconds_sum", ())] > 0
    # queues, per queue and state
    for queue in ("embed", "push"):
        for state in ("queued", "started", "scheduled", "failed"):
            assert ("pacs_embed_queue_jobs", (("queue", queue), ("state", state))) in after
    assert after[("pacs_embed_queue_jobs", (("queue", "push"), ("state", "failed")))] == 0
    # flags: both kinds shown (three images are too few for a reference: none flagged)
    for kind in ("outlier", "label_mismatch"):
        assert ("pacs_embed_flags_total", (("kind", kind),)) in after
    # pushes by sink and outcome, no dead letters
    assert after[("pacs_embed_pushes_total", (("outcome", "sent"), ("sink", "webhook")))] == 3
    assert after[("pacs_embed_dead_letters", ())] == 0
    # study completion: three versions, each at least stable_seconds after its last arrival
    assert after[(completion, ())] == 3
    assert after[("pacs_embed_study_completion_seconds_sum", ())] >= 3 * 1.0
    assert after[("pacs_embed_study_completion_seconds_bucket", (("le", "+Inf"),))] == 3
