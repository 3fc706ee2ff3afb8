"""Admin endpoint: bearer token on everything but /healthz; status document from real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.admin import status
from pipeline.admin.server import AdminServer
from pipeline.ledger import Ledger
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
    """/status reports the ledger's counts, queue depths and failures with reasons."""
    ledger = Ledger(redis_conn)
    ledger.received(["1.2.3", "1.2.4"])
    ledger.failed("1.2.4", "convert", "conversion: unsupported Bits Allocated 7")
    code, doc = get(server, "/status", "t0ken")
    assert code == 200
    assert doc["instances"] == {
        "received": 2,
        "converted": 0,
        "embedded": 0,
        "failed": 1,
        "skipped": 0,
    }
    assert doc["queues"] == {
        "embed": {"queued": 0, "started": 0, "scheduled": 0, "failed": 0, "finished": 0}
    }
    failures = doc["failures"]
    assert isinstance(failures, list) and failures[0]["reason"].endswith("Bits Allocated 7")


def test_unknown_path_404(server: AdminServer) -> None:
    """Unknown paths are 404, not a stack trace."""
    assert get(server, "/nope", "t0ken")[0] == 404
