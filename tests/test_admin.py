"""Admin endpoint: one route table, bearer token on everything but /healthz; status document
from real Redis."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterator
from itertools import takewhile
from pathlib import Path

import pytest
import redis

from pipeline.admin import routes
from pipeline.admin import server as admin_server
from pipeline.admin.server import AdminServer
from pipeline.ledger import Ledger, Stage
from tests.admin_http import composed_admin, get

TOKEN = "t0ken"  # noqa: S105 - the test's admin token, not a secret

#: The routes docs/architecture.md §2 lists; only /healthz and the status page's shell (no data
#: in it) answer without the bearer token.
DOCUMENTED = {
    "/healthz",
    "/readyz",
    "/status",
    "/metrics",
    "/verdicts",
    "/search",
    "/studies",
    "/studies/{study_uid}",
    "/failures",
    "/requeue",
    "/",
}
OPEN = {"/healthz", "/"}
#: A path of the table as it appears in a docstring or the docs.
PATH = r"/(?:[\w{}]+(?:/[\w{}]+)*)?"


@pytest.fixture
def server(redis_conn: redis.Redis, tmp_path: Path) -> Iterator[AdminServer]:
    """The admin server `pacs-embed admin` serves, as the composition root builds it."""
    yield from composed_admin(redis_conn, tmp_path, TOKEN)


def test_the_route_table_is_every_route(server: AdminServer) -> None:
    """The server answers exactly the paths of ``routes.table`` (the ones documented), each
    behind the bearer token except /healthz and the page's shell; any other path is 404."""
    assert set(server.routes) == DOCUMENTED
    assert {path for path, route in server.routes.items() if not route.token} == OPEN
    for path in DOCUMENTED:
        target = path.replace("{study_uid}", "1.2.3")
        code, _body = get(server, target)
        assert code == (200 if path in OPEN else 401), path
        code, _body = get(server, target, "wrong")
        assert code == (200 if path in OPEN else 401), path
        assert get(server, target, TOKEN)[0] not in (401, 404) or path.startswith("/studies/")
    assert get(server, "/nope")[0] == 404
    assert get(server, "/healthz/", TOKEN)[0] == 404
    assert get(server, "/studies/1.2/3", TOKEN)[0] == 404


def test_the_route_table_is_the_only_declaration() -> None:
    """Routes are declared once: the server module names no path, the table's docstring and
    docs/architecture.md list the same paths as the table."""
    literals = {
        node.value
        for node in ast.walk(ast.parse(inspect.getsource(admin_server)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    assert not {text for text in literals if re.fullmatch(PATH, text)}
    table_source = inspect.getsource(routes.table)
    assert set(re.findall(rf'"({PATH})": Route\(', table_source)) == DOCUMENTED
    rows = re.findall(rf"^    ({PATH}) +(?:GET|POST) ", routes.__doc__ or "", re.MULTILINE)
    assert set(rows) == DOCUMENTED
    docs = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    lines = docs.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(" admin HTTP:"))
    follow = takewhile(lambda line: line.startswith("   /"), lines[start + 1 :])
    block = [lines[start], *follow]
    admin = " ".join(block).split("(reads")[0].removeprefix(" admin HTTP:")
    assert {word.strip(",") for word in admin.split() if word.startswith("/")} == DOCUMENTED


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
    code, doc = get(server, "/status", TOKEN)
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
    empty = {"queued": 0, "started": 0, "scheduled": 0, "failed": 0, "finished": 0}
    assert doc["queues"] == {"embed": empty, "push": empty}
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
    assert get(server, "/nope", TOKEN)[0] == 404
