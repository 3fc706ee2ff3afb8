"""Shared fixtures: a real Redis server, free loopback ports, a running daemon."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

if TYPE_CHECKING:
    from tests.daemon import Daemon


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a loopback port for the whole session; yields its URL."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    directory = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_conn(redis_server: str) -> Iterator[redis.Redis]:
    """A connection to a freshly flushed database."""
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """`pacs-embed run` on its own state dir (not started); stopped at the end if it runs."""
    from tests.daemon import Daemon  # tests.daemon imports this module: import late

    d = Daemon(tmp_path / "var", tmp_path / "daemon.log", QUEUE__LINGER_SECONDS="0.3")
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.stop()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "var"
    path.mkdir()
    return path
