"""Talk to an AdminServer on loopback: as a monitoring probe would (:func:`get`), or byte by byte
as a broken or hostile client would (:func:`exchange`)."""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

import redis

from pacs_embed.compose import Root
from pipeline.admin.server import AdminServer
from pipeline.settings import Settings
from tests.conftest import free_port

Address = tuple[str, int]


@contextmanager
def serving(admin: AdminServer) -> Iterator[AdminServer]:
    """``admin`` served from a thread for the block, shut down after it."""
    admin.start_in_thread()
    try:
        yield admin
    finally:
        admin.shutdown()


def composed_admin(connection: redis.Redis, state_dir: Path, token: str) -> Iterator[AdminServer]:
    """The admin server as the composition root builds it (`pacs-embed admin`), served from a
    thread: the body of a pytest fixture (``yield from``)."""
    (state_dir / "spool" / "tmp").mkdir(parents=True)
    settings = Settings.load(
        state_dir=state_dir, admin={"host": "127.0.0.1", "port": free_port(), "token": token}
    )
    with serving(Root(settings, connection).admin) as admin:
        yield admin


def get(server: AdminServer, path: str, token: str | None = None) -> tuple[int, Any]:
    """(HTTP status, decoded JSON body, or the text of another content type such as /metrics');
    error statuses are returned, not raised."""
    host, port = server.address
    request = urllib.request.Request(f"http://{host}:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return response.status, _body(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _body(exc)


def _body(response: HTTPResponse | urllib.error.HTTPError) -> Any:
    if response.headers.get_content_type() == "application/json":
        return json.load(response)
    return response.read().decode()


@dataclass(frozen=True)
class Answer:
    """One HTTP answer as it came over the wire."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get_content_type()

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(method: str, target: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 request head, byte for byte what is given (no validation)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *_header_lines(headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _header_lines(headers: dict[str, str] | None) -> list[str]:
    return [f"{name}: {value}" for name, value in (headers or {}).items()]


def exchange(address: Address, data: bytes, *, piece: int | None = None) -> Answer:
    """Send ``data`` at once, or in ``piece``-byte pieces with a pause between them, stopping as
    soon as the server answers (as a client does when refused mid-request); read the answer."""
    with socket.create_connection(address, timeout=10) as sock:
        if piece is None:
            sock.sendall(data)
        else:
            for start in range(0, len(data), piece):
                if select.select([sock], [], [], 0.005)[0]:
                    break  # answered (refused) already
                sock.sendall(data[start : start + piece])
        return read_answer(sock)


def read_answer(sock: socket.socket) -> Answer:
    response = HTTPResponse(sock)
    response.begin()
    with response:
        return Answer(response.status, response.headers, response.read())


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (whatever it sent before), None if it did not
    within ``seconds``."""
    start = time.monotonic()
    try:
        while True:
            left = seconds - (time.monotonic() - start)
            if left <= 0:
                return None
            sock.settimeout(left)
            if not sock.recv(65536):
                break
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start
