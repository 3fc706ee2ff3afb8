"""Test harness: `pacs-embed run` as a real process group, driven like an operator would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from tests.conftest import free_port
from tests.sinks_peers import Recorded

AE_TITLE = "PACS_EMBED"


class Daemon:
    def __init__(self, state_dir: Path, log_path: Path, **settings: str) -> None:
        self.state_dir = state_dir
        self.log_path = log_path
        self.dicom_port = free_port()
        self.admin_port = free_port()
        self.env = {
            **os.environ,
            "PACS_EMBED_STATE_DIR": str(state_dir),
            "PACS_EMBED_LISTENER__HOST": "127.0.0.1",
            "PACS_EMBED_LISTENER__PORT": str(self.dicom_port),
            "PACS_EMBED_ADMIN__PORT": str(self.admin_port),
            "PACS_EMBED_EMULATOR__PORT": str(free_port()),
            "PACS_EMBED_LISTENER__MIN_FREE_DISK_MB": "16",
            **{f"PACS_EMBED_{k.upper()}": v for k, v in settings.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._family: list[int] = []

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> Daemon:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_embed", "run"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.wait_for(lambda: self._get("/healthz") is not None, timeout, "admin /healthz")
        self.wait_for(lambda: echo(self.dicom_port) == 0, timeout, "C-ECHO")
        return self

    def stop(self, timeout: float = 30.0) -> int:
        """Ctrl-C, as an operator would; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self._family = descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        return int(self.proc.returncode)

    def kill9(self) -> None:
        """``kill -9`` of `run`: its children must die with it (PR_SET_PDEATHSIG)."""
        assert self.proc is not None
        self._family = descendants(self.proc.pid)
        self.proc.kill()
        self.proc.wait(10)

    def family_alive(self, timeout: float = 5.0) -> list[int]:
        """PIDs of `run`'s children (seen at kill/stop time) still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [pid for pid in self._family if running(pid)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    # -- observing ----------------------------------------------------------------------------
    def token(self) -> str:
        return (self.state_dir / "secrets" / "admin.token").read_text().strip()

    def redis(self) -> redis.Redis:
        """The private Redis of this state dir (the URL file `run` writes)."""
        url = (self.state_dir / "redis" / "url").read_text().strip()
        return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)

    def _get(self, path: str, token: str | None = None) -> dict[str, Any] | None:
        return get_json(self.admin_port, path, token)

    def status(self) -> dict[str, Any]:
        doc = self._get("/status", self.token())
        assert doc is not None, "admin /status did not answer"
        return doc

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) waiting for {what}\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.log_tail()}")
            time.sleep(0.2)

    def wait_embedded(self, n: int, timeout: float = 120.0) -> dict[str, Any]:
        self.wait_for(lambda: self.status()["instances"]["embedded"] >= n, timeout, f"{n} embedded")
        return self.status()

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue
        return lines

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pacs_embed", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def get_json(port: int, path: str, token: str | None = None) -> dict[str, Any] | None:
    """GET a loopback admin endpoint's JSON; None while it does not answer (or answers garbage)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return dict(json.load(response))
    except (OSError, ValueError):
        return None


class WebhookBodies:
    """An HTTPReceiver handler that keeps every webhook body it is sent (and answers 204)."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def answer(self, request: Recorded) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            self.got.append(json.loads(request.body))
        return 204, {}, b""

    def versions(self, study: str | None = None) -> list[int]:
        """The versions delivered so far, in order; only ``study``'s if given."""
        with self.lock:
            return [
                b["version"] for b in self.got if study is None or b["study_instance_uid"] == study
            ]

    def vector(self, version: int, sop: str) -> np.ndarray:
        with self.lock:
            body = next(b for b in self.got if b["version"] == version)
        image = next(i for i in body["images"] if i["sop_instance_uid"] == sop)
        return np.asarray(image["vector"])


def dcmtk_env() -> dict[str, str]:
    """DCMTK 3.6.7 leaves Nagle on: without TCP_NODELAY each image stalls ~45 ms on loopback."""
    return {**os.environ, "TCP_NODELAY": "1"}


def echo(port: int) -> int:
    return subprocess.run(
        ["echoscu", "-aec", AE_TITLE, "127.0.0.1", str(port)],
        env=dcmtk_env(),
        capture_output=True,
        timeout=30,
        check=False,
    ).returncode


def storescu(port: int, files: list[Path], *extra: str) -> subprocess.CompletedProcess[str]:
    """Send files in one association; -v so each response's status is in the output."""
    return subprocess.run(
        [
            "storescu",
            "-v",
            "-aec",
            AE_TITLE,
            "-aet",
            "STORESCU",
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def successes(result: subprocess.CompletedProcess[str]) -> int:
    return (result.stdout + result.stderr).count("Received Store Response (Success)")


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first); None once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` in kB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init, which may never reap it)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms until it holds; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def descendants(root: int) -> list[int]:
    """Every live process below ``root``, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = proc_stat(int(stat.parent.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def argv(pid: int) -> list[bytes]:
    """``pid``'s command line, one item per argument ([] once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def role(pid: int) -> str:
    """The subcommand a `pacs-embed` child runs (its last argument)."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")[-1].decode()


def children(daemon: Daemon, needle: bytes = b"") -> list[int]:
    """`run`'s live direct children with an argument holding ``needle`` (rq forks a scheduler
    below a worker, with the same command line: only direct children count)."""
    assert daemon.proc is not None
    found = []
    for pid in descendants(daemon.proc.pid):
        fields = proc_stat(pid)
        if fields is None or int(fields[1]) != daemon.proc.pid:
            continue
        if any(needle in arg for arg in argv(pid)):
            found.append(pid)
    return found
