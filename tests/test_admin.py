"""Admin endpoint: bearer token on everything but /healthz; status document from real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.admin import status
from pipeline.admin.server import AdminServer
from pipeline.ledger import Ledger, Stage
from tests.admin_http import get


@pytest.fixture
def server(redis_conn: redis.Redis, tmp_path: Path) -> Iterator[AdminServer]:
    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    routes = {
        "/status": lambda _query: (
            200,
            status.gather(redis_conn, tmp_path / "spool", tmp_path / "q"),
        ),
    }
    admin = AdminServer("127.0.0.1", 0, "t0ken", routes)
    admin.start_in_thread()
    yield admin
    admin.shutdown()


def test_healthz_needs_no_token(server: AdminServer) -> None:
    """/healthz answers anyone: load balancers and probes have no token."""
    assert get(server, "/healthz") == (200, {"status": "ok"})


def test_status_needs_the_token(server: AdminServer) -> None:
    """/status without or with a wrong bearer token is 401."""
    assert get(server, "/status")[0] == 401
    assert get(server, "/status", "wrong")[0] == 401


def test_status_counts_instances(server: AdminServer, redis_conn: redis.Redis) -> None:
    """/status reports exclusive current states that add up to received, cumulative counters
    apart, queue depths, and failures newest first with ISO 8601 times."""
    ledger = Ledger(redis_conn)
    ledger.spooled(["1.2.3", "1.2.4", "1.2.5", "1.2.6"])
    ledger.converting(["1.2.4", "1.2.5", "1.2.6"])
    ledger.failed("1.2.4", Stage.CONVERT, "unsupported Bits Allocated 7", "decoder said no")
    ledger.converted("1.2.5", {"series": "1.2"})
    ledger.skipped("1.2.6", "not an image to embed: Modality SEG (convert.embed_modalities)")
    ledger.failed("1.2.6", Stage.CONVERT, "a later, second failure")
    code, doc = get(server, "/status", "t0ken")
    assert code == 200
    assert doc["instances"] == {
        "received": 4,
        "spooled": 1,
        "converting": 0,
        "queued": 1,
        "embedded": 0,
        "skipped": 0,
        "failed": 2,
    }
    assert doc["counters"] == {
        "received": 4,
        "converted": 1,
        "failed_convert": 2,
        "skipped": 1,
    }
    assert doc["queues"] == {
        "embed": {"queued": 0, "started": 0, "scheduled": 0, "failed": 0, "finished": 0}
    }
    failures = doc["failures"]
    assert [f["sop_instance_uid"] for f in failures] == ["1.2.6", "1.2.4"]
    assert failures[1]["reason"] == "unsupported Bits Allocated 7"
    assert failures[1]["detail"] == "decoder said no" and failures[1]["at"].endswith("Z")
    assert doc["skipped"] == {"recent": []}  # 1.2.6 left "skipped" when it failed


def test_resend_clears_a_stale_failure(redis_conn: redis.Redis) -> None:
    """A failed instance sent again is spooled anew: its failure no longer counts or shows."""
    ledger = Ledger(redis_conn)
    ledger.spooled(["1.2.3"])
    ledger.failed("1.2.3", Stage.CONVERT, "truncated")
    ledger.spooled(["1.2.3"])
    assert ledger.counts()["failed"] == 0 and ledger.failures() == []
    assert ledger.counts() == {**dict.fromkeys(ledger.counts(), 0), "received": 1, "spooled": 1}


def test_unknown_path_404(server: AdminServer) -> None:
    """Unknown paths are 404, not a stack trace."""
    assert get(server, "/nope", "t0ken")[0] == 404
