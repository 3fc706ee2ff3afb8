"""/readyz's spool watermark and endpoint checks: the spool's free disk against
``listener.min_free_disk_mb``; the endpoint reachable, probed cheaply (cached) — the local
emulator's /healthz, any HTTP answer of a real endpoint, never a refused or silent port."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from emulator.server import EmulatorServer
from pacs_embed.compose import Root, endpoint_probe
from pipeline import health
from pipeline.admin import status
from pipeline.admin.probe import EndpointProbe
from pipeline.settings import Settings
from tests.admin_http import get, serving
from tests.conftest import free_port

TOKEN = "t0ken"  # noqa: S105 - the test's admin token


class _Unauthorized(BaseHTTPRequestHandler):
    """An Azure-like scoring URI: 401 to a request without a key, whatever the method."""

    def do_HEAD(self) -> None:
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def azure_like() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/score"


def test_any_http_answer_is_reachable_a_refused_port_is_not(azure_like: str) -> None:
    assert EndpointProbe.scoring_uri(azure_like)() is True  # 401: it answers
    assert EndpointProbe.scoring_uri(f"http://127.0.0.1:{free_port()}/score")() is False


def test_a_silent_endpoint_times_out_unreachable(silent: str) -> None:
    probe = EndpointProbe(silent, healthz=False, timeout=0.3)
    assert probe() is False


def test_the_probe_is_cached(azure_like: str) -> None:
    """One request per ``ttl``, whatever the answer; a new one once it has passed."""
    now = [100.0]
    probe = EndpointProbe(azure_like, healthz=False, ttl=30.0, clock=lambda: now[0])
    assert probe() and probe() and probe.probes == 1
    now[0] += 29.0
    assert probe() and probe.probes == 1
    now[0] += 1.5
    assert probe() and probe.probes == 2


def test_the_probe_follows_the_configured_endpoint() -> None:
    """The local emulator: its /healthz; any other endpoint: its scoring URI; none: no check."""
    emulator = Settings.load(endpoint={"url": "http://127.0.0.1:8765/score", "auth": "none"})
    probe = endpoint_probe(emulator)
    assert probe is not None and (probe.url, probe.healthz) == (
        "http://127.0.0.1:8765/healthz",
        True,
    )
    azure = Settings.load(
        endpoint={"url": "https://x.inference.ml.azure.com/score", "auth": "none"}
    )
    probe = endpoint_probe(azure)
    assert probe is not None and (probe.url, probe.healthz) == (azure.endpoint.url, False)
    assert endpoint_probe(Settings.load()) is None


def test_spool_below_the_watermark_is_not_ready(redis_conn: redis.Redis, tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    health.publish(redis_conn, health.WORKER, {"state": "idle"}, ttl=60)
    assert status.ready(redis_conn, tmp_path, min_free_bytes=1)["spool_free_disk"] is True
    checks = status.ready(redis_conn, tmp_path, min_free_bytes=1 << 62)
    assert checks["spool_free_disk"] is False and checks["spool_writable"] is True
    assert "endpoint" not in checks  # no probe, no check
    assert status.ready(redis_conn, tmp_path / "gone")["spool_free_disk"] is False


def _admin(tmp_path: Path, redis_conn: redis.Redis, **settings: Any) -> Root:
    (tmp_path / "spool" / "tmp").mkdir(parents=True, exist_ok=True)
    loaded = Settings.load(
        state_dir=tmp_path,
        admin={"host": "127.0.0.1", "port": free_port(), "token": TOKEN},
        **settings,
    )
    return Root(loaded, redis_conn)


def test_readyz_names_the_endpoint_and_the_spool_when_they_fail(
    redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """With the emulator serving: 200, ``endpoint`` true. An endpoint on a refused port and a
    watermark above the disk's free space: 503 naming both under ``failing``."""
    health.publish(redis_conn, health.WORKER, {"state": "idle"}, ttl=60)
    port = free_port()
    emulated = {"url": f"http://127.0.0.1:{port}/score", "auth": "none"}
    root = _admin(tmp_path, redis_conn, endpoint=emulated, emulator={"port": port})
    with EmulatorServer(root.settings.emulator):
        with serving(root.admin) as admin:
            code, body = get(admin, "/readyz", TOKEN)
    assert (code, body["endpoint"], body["failing"]) == (200, True, []), body
    refused = {"url": f"http://127.0.0.1:{free_port()}/score", "auth": "none"}
    root = _admin(
        tmp_path / "b", redis_conn, endpoint=refused, listener={"min_free_disk_mb": 1 << 40}
    )
    with serving(root.admin) as admin:
        code, body = get(admin, "/readyz", TOKEN)
    assert code == 503 and sorted(body["failing"]) == ["endpoint", "spool_free_disk"], body
    assert body["spool_writable"] is True and body["redis"] is True
