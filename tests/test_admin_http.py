"""The admin endpoint as an HTTP server: bounded time and size per client, JSON for every error,
no Python exception text on the wire, a clean stop on SIGTERM, /readyz following Redis."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from structlog.testing import capture_logs

from pacs_embed.compose import Root
from pipeline import health
from pipeline.admin.limits import Limits
from pipeline.admin.routes import Route
from pipeline.admin.server import AdminServer
from pipeline.settings import Settings
from tests.admin_http import (
    Answer,
    closed_within,
    composed_admin,
    exchange,
    read_answer,
    request_bytes,
)
from tests.conftest import free_port

TOKEN = "t0ken"  # noqa: S105 - the test's admin token, not a secret
BEARER = {"Authorization": f"Bearer {TOKEN}"}
DEFAULTS = Limits()


def json_error(answer: Answer, status: int) -> dict[str, object]:
    """``answer`` is the JSON error ``status``, with nothing that looks like a page or a trace."""
    assert answer.status == status, answer
    assert answer.content_type == "application/json", answer
    text = answer.body.decode()
    for leak in ("<html", "<!DOCTYPE", "Traceback", 'File "', "invalid literal"):
        assert leak.lower() not in text.lower(), text
    document = answer.json()
    assert isinstance(document, dict) and isinstance(document["error"], str)
    return document


@pytest.fixture
def server(redis_conn: redis.Redis, tmp_path: Path) -> Iterator[AdminServer]:
    """The admin server as the composition root builds it, served from a thread."""
    yield from composed_admin(redis_conn, tmp_path, TOKEN)


def serve(routes: dict[str, Route], limits: Limits) -> AdminServer:
    admin = AdminServer("127.0.0.1", 0, TOKEN, routes, limits)
    admin.start_in_thread()
    return admin


# -- sizes, methods, parameters, failures: every error is JSON ---------------------------------


def test_unknown_method_is_a_json_405(server: AdminServer) -> None:
    """`BREW /status` and `POST /healthz` are 405 naming the allowed methods; off the table 404."""
    for method, path in (("BREW", "/status"), ("POST", "/healthz"), ("DELETE", "/readyz")):
        answer = exchange(server.address, request_bytes(method, path, BEARER))
        assert json_error(answer, 405) == {"error": "Method Not Allowed"}
        assert set(answer.headers["Allow"].split(", ")) == {"GET", "HEAD"}  # Starlette: a set
    assert json_error(exchange(server.address, request_bytes("BREW", "/nope")), 404)


@pytest.mark.parametrize("piece", [None, 1024], ids=["at-once", "in-pieces"])
def test_a_10_kb_url_is_a_json_414(server: AdminServer, piece: int | None) -> None:
    """A 10 kB request target is 414, whether its head arrives in one read or in many."""
    data = request_bytes("GET", "/search?sop=" + "1" * 10_000, BEARER)
    json_error(exchange(server.address, data, piece=piece), 414)


@pytest.mark.parametrize("piece", [None, 1024], ids=["at-once", "in-pieces"])
def test_100_kb_of_headers_is_a_json_431(server: AdminServer, piece: int | None) -> None:
    """100 kB of headers is 431, whether they arrive in one read or in many."""
    headers = {**BEARER, **{f"X-Filler-{i}": "x" * 1000 for i in range(100)}}
    data = request_bytes("GET", "/status", headers)
    json_error(exchange(server.address, data, piece=piece), 431)


def test_a_malformed_request_is_a_json_400(server: AdminServer) -> None:
    """What h11 cannot parse (a header line without a colon, a bad request line) is 400 JSON."""
    for data in (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", b"\x16\x03\x01 junk\r\n\r\n"):
        json_error(exchange(server.address, data), 400)


def test_bad_parameters_are_400_naming_them(server: AdminServer) -> None:
    """Each unusable query parameter is a 400 naming it, with no Python exception text."""
    cases = {
        "/search?sop=1.2.3&top=abc": "top",
        "/search?sop=1.2.3&top=0": "top",
        "/search?sop=1.2.3&top=100000": "top",
        "/search?sop=1.2.3&top=%2B5": "top",  # int() takes "+5"
        "/search?sop=1.2.3&top=%D9%A3": "top",  # and an Arabic-Indic three
        "/search?sop=1.2.3&top=" + "9" * 5000: "top",  # and refuses past 4300 digits
        "/search?sop=1.2.3&cohort=a/b/c/d": "cohort",
        "/search?sop=not-a-uid": "sop",
        "/search": "sop",
        "/verdicts?study=1.2.x": "study",
        "/verdicts?series=": "series",
        "/verdicts": "study",
    }
    for target, name in cases.items():
        answer = exchange(server.address, request_bytes("GET", target, BEARER))
        if len(target) > DEFAULTS.max_url_bytes:
            json_error(answer, 414)  # refused before the route: as good
            continue
        assert json_error(answer, 400)["parameter"] == name, target


def test_a_handler_that_raises_is_503_naming_the_class_only() -> None:
    """A failing handler is 503 `{"error": "<class>"}`: no message, no traceback on the wire;
    the traceback is logged."""

    def boom(_query: object) -> tuple[int, dict[str, object]]:
        raise ZeroDivisionError("secret detail 1.2.840.99")

    admin = serve({"/boom": Route(boom, token=False)}, DEFAULTS)
    try:
        with capture_logs() as logs:
            answer = exchange(admin.address, request_bytes("GET", "/boom"))
    finally:
        admin.shutdown()
    assert json_error(answer, 503) == {"error": "ZeroDivisionError"}
    assert b"secret" not in answer.body and b"1.2.840" not in answer.body
    [entry] = [e for e in logs if e["event"] == "admin.error"]
    assert entry["path"] == "/boom" and entry["exc_info"] is True


def test_401_says_nothing_more(server: AdminServer) -> None:
    """Every route but /healthz and the page's shell is 401 `{"error": "Unauthorized"}` without
    the right token, however it is wrong (missing, another, another scheme, not ASCII)."""
    wrong: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer t\xf6ken"},
    ]
    for path in server.routes:
        for headers in wrong:
            answer = exchange(server.address, request_bytes("GET", path, headers))
            if not server.routes[path].token:
                assert answer.status == 200
                continue
            assert json_error(answer, 401) == {"error": "Unauthorized"}, (path, headers)
            assert answer.headers["WWW-Authenticate"] == "Bearer"


def test_the_connection_cap_answers_503_at_once() -> None:
    """Past ``max_connections`` open connections a new one gets a JSON 503 and is closed, at
    once; once they go, the server answers again."""
    admin = serve({"/healthz": Route(lambda _q: (200, {}), token=False)}, Limits(max_connections=5))
    idle = [socket.create_connection(admin.address) for _ in range(5)]
    try:
        with socket.create_connection(admin.address, timeout=2) as sock:
            json_error(read_answer(sock), 503)
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        assert exchange(admin.address, request_bytes("GET", "/healthz")).status == 200
    finally:
        for sock in idle:
            sock.close()
        admin.shutdown()


# -- time: stalled clients are let go ----------------------------------------------------------


def test_stalled_and_idle_connections_are_closed() -> None:
    """A half-sent request gets a JSON 408 and is closed after ``request_seconds``; a connection
    that sends nothing, or stays idle after an answer, is closed without an answer."""
    limits = Limits(request_seconds=1.0, keep_alive_seconds=1)
    admin = serve({"/healthz": Route(lambda _q: (200, {}), token=False)}, limits)
    try:
        with socket.create_connection(admin.address) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            json_error(read_answer(sock), 408)
        with socket.create_connection(admin.address) as sock:
            waited = closed_within(sock, 5)
            assert waited is not None and waited < 2
        with socket.create_connection(admin.address) as sock:
            sock.sendall(request_bytes("GET", "/healthz"))
            assert read_answer(sock).status == 200
            waited = closed_within(sock, 5)
            assert waited is not None and waited < 2
    finally:
        admin.shutdown()


@dataclass
class AdminProcess:
    """`pacs-embed admin` as its own process, as `pacs-embed run` starts it."""

    proc: subprocess.Popen[bytes]
    address: tuple[str, int]

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def threads(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line[:8] == "Threads:"))

    def healthz_seconds(self) -> float:
        start = time.monotonic()
        url = f"http://{self.address[0]}:{self.address[1]}/healthz"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
        return time.monotonic() - start


@pytest.fixture
def admin_process(redis_server: str, tmp_path: Path) -> Iterator[AdminProcess]:
    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    port = free_port()
    env = {
        **os.environ,
        "PACS_EMBED_STATE_DIR": str(tmp_path),
        "PACS_EMBED_REDIS__URL": redis_server,
        "PACS_EMBED_ADMIN__PORT": str(port),
        "PACS_EMBED_ADMIN__TOKEN": TOKEN,
    }
    with (tmp_path / "admin.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_embed", "admin"], env=env, stdout=log, stderr=log
        )
    admin = AdminProcess(proc, ("127.0.0.1", port))
    deadline = time.monotonic() + 30
    while True:
        try:
            admin.healthz_seconds()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "admin did not start"
            time.sleep(0.1)
    yield admin
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_stops_the_admin_process_with_status_0(
    admin_process: AdminProcess, signum: signal.Signals, tmp_path: Path
) -> None:
    """SIGTERM or SIGINT stops `pacs-embed admin` promptly with exit status 0, even with a
    keep-alive connection open."""
    with socket.create_connection(admin_process.address) as sock:
        sock.sendall(request_bytes("GET", "/healthz"))
        assert read_answer(sock).status == 200
        start = time.monotonic()
        admin_process.proc.send_signal(signum)
        assert admin_process.proc.wait(DEFAULTS.shutdown_seconds + 5) == 0
    assert time.monotonic() - start < 3
    log = (tmp_path / "admin.log").read_text()
    assert "admin.stopped" in log and "Traceback" not in log


def test_200_half_sent_requests_hold_no_thread_and_are_let_go(admin_process: AdminProcess) -> None:
    """200 clients that send half a request line or half the headers and stall: the server
    keeps answering /healthz at once, spends no thread on them, and closes every one within
    ``request_seconds`` (with a JSON 408); then its descriptors are back where they were."""
    fds, threads = admin_process.fds(), admin_process.threads()
    halves = (b"GET /stat", b"GET /status HTTP/1.1\r\nHost: x\r\nAuthoriza")
    stalled = [socket.create_connection(admin_process.address) for _ in range(200)]
    try:
        for i, sock in enumerate(stalled):
            sock.sendall(halves[i % 2])
        time.sleep(0.5)
        assert admin_process.healthz_seconds() < 0.5
        assert admin_process.threads() <= threads + 2
        assert admin_process.fds() <= fds + 200 + 2  # their sockets, until the deadline
        waits = [closed_within(sock, DEFAULTS.request_seconds + 3) for sock in stalled]
        assert None not in waits
    finally:
        for sock in stalled:
            sock.close()
    time.sleep(0.3)
    assert admin_process.fds() <= fds + 2
    with socket.create_connection(admin_process.address) as sock:
        sock.sendall(halves[1])
        json_error(read_answer(sock), 408)


# -- /readyz follows Redis ---------------------------------------------------------------------


class RedisOnPort:
    """A redis-server that a test stops and starts again on the same port."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and self.proc.poll() is None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def test_readyz_is_503_while_redis_is_down_and_200_when_it_is_back(tmp_path: Path) -> None:
    """/readyz: 200 with Redis up; 503 naming ``redis`` among the failing checks while it is
    stopped; 200 again once it is restarted on the same port."""
    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    (tmp_path / "redis").mkdir()
    server = RedisOnPort(tmp_path / "redis")
    server.start()
    settings = Settings.load(
        state_dir=tmp_path,
        redis={"url": server.url},
        admin={"host": "127.0.0.1", "port": free_port(), "token": TOKEN},
    )
    root = Root(settings)
    admin = root.admin
    admin.start_in_thread()
    readyz = request_bytes("GET", "/readyz", BEARER)

    def a_worker_reports() -> None:
        with redis.Redis.from_url(server.url) as client:
            health.publish(client, health.WORKER, {"state": "idle"}, ttl=60)

    try:
        answer = exchange(admin.address, readyz)
        assert answer.status == 503 and answer.json()["failing"] == ["workers"]
        a_worker_reports()
        answer = exchange(admin.address, readyz)
        assert answer.status == 200 and answer.json()["failing"] == []
        server.stop()
        answer = exchange(admin.address, readyz)
        assert answer.status == 503 and answer.content_type == "application/json"
        assert answer.json()["redis"] is False and "redis" in answer.json()["failing"]
        server.start()
        a_worker_reports()
        answer = exchange(admin.address, readyz)
        assert answer.status == 200, answer.json()
    finally:
        admin.shutdown()
        root.close()
        server.stop()
