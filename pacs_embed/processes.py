"""Child processes for `pacs-embed run`: a private redis-server and our own subcommands.

Each child gets its own process group, so a Ctrl-C in the terminal reaches only `run`, which then
stops the children in order (workers finish their job, Redis flushes its AOF last). And children
die with their parent: Linux's PR_SET_PDEATHSIG, set in the child before exec, so a ``kill -9`` of
`run` leaves no orphan holding the ports or the Redis files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis
import structlog

from pipeline.lifetime import die_with_parent

log = structlog.get_logger(__name__)

MAX_UNIX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux


#: Set for our own children; the CLI then calls die_with_parent() first thing. (Doing it in the
#: child rather than in a preexec_fn: `run` respawns workers while its threads are running.)
PARENT_PID_ENV = "PACS_EMBED_PARENT_PID"


def spawn_self(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``python -m pacs_embed ARGS`` with ``env`` added to ours."""
    return subprocess.Popen(
        [sys.executable, "-m", "pacs_embed", *args],
        env={**os.environ, **env, PARENT_PID_ENV: str(os.getpid())},
        process_group=0,
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class PrivateRedis:
    """A redis-server under the state dir, append-only, reachable only by this host."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.socket = self.directory / "redis.sock"
        if len(str(self.socket)) <= MAX_UNIX_SOCKET_PATH:
            self.url = f"unix://{self.socket}"
        else:  # a deep state dir: fall back to a loopback port
            self.url = f"redis://127.0.0.1:{free_port()}/0"

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start redis-server on our files (replaying its AOF); :meth:`wait` for it to serve.

        Called again by the supervisor after the server died: same files, same address.
        """
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._kill_stale()
        args = [
            "redis-server",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",  # a state change acknowledged is on disk: a kill -9 loses none of them
            "--save",
            "",
            "--pidfile",
            str(self.directory / "redis.pid"),
            "--logfile",
            str(self.directory / "redis.log"),
            "--bind",
            "127.0.0.1",
        ]
        if self.url.startswith("unix://"):
            args += ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        else:
            args += ["--port", self.url.rsplit(":", 1)[1].split("/")[0]]
        # preexec_fn is safe here: `run` has no thread besides the one that spawns.
        proc = subprocess.Popen(args, process_group=0, preexec_fn=die_with_parent)
        log.info("redis.started", url=self.url, pid=proc.pid)
        return proc

    def wait(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        wait_for_redis(self.url, timeout, proc)
        # So `pacs-embed status` / `embeddings export` find this Redis with no configuration.
        (self.directory / "url").write_text(self.url + "\n")

    def _kill_stale(self) -> None:
        """A redis left by a killed `run` (on a non-Linux host) would hold our files."""
        pidfile = self.directory / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"redis-server" in cmdline:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        """Started, serving and stopped around a ``with`` block (benches); yields its URL."""
        proc = self.spawn()
        try:
            self.wait(proc)
            yield self.url
        finally:
            stop(proc)
            self.forget()

    def forget(self) -> None:
        """After the server stopped: `pacs-embed status` must not find it any more."""
        (self.directory / "url").unlink(missing_ok=True)


def wait_for_redis(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url)
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
