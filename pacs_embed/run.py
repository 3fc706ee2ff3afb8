"""`pacs-embed run`: the whole daemon on one machine, in the foreground.

Starts what is not configured — a private Redis under the state dir, the local endpoint
(emulator) — then the embed workers as child processes, and the listener and admin endpoint in
this process. Ctrl-C (or SIGTERM) stops everything it started, in reverse order.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import redis
import structlog

from dicom_listener.server import Listener
from pacs_embed.processes import PrivateRedis, spawn_self, stop
from pacs_embed.secrets import ensure_secret_file
from pacs_embed.services import admin_server
from pipeline.keys import INFLIGHT_PATTERN
from pipeline.settings import Settings

log = structlog.get_logger(__name__)


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - our own URL
                if response.status == 200:
                    return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: process exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run(settings: Settings, config_args: list[str]) -> int:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())

    env: dict[str, str] = {"PACS_EMBED_STATE_DIR": str(settings.state_dir)}
    private_redis = None
    children: list[subprocess.Popen[bytes]] = []
    listener = admin = None
    try:
        if settings.redis.url is None:
            private_redis = PrivateRedis(settings.state_dir / "redis")
            env["PACS_EMBED_REDIS__URL"] = private_redis.start()
            _drop_stale_leases(env["PACS_EMBED_REDIS__URL"])
        if settings.endpoint.url is None:
            key_file = settings.emulator.key_file or settings.secrets_dir / "endpoint.key"
            if settings.emulator_key() is None:
                ensure_secret_file(key_file)
                env["PACS_EMBED_EMULATOR__KEY_FILE"] = str(key_file)
            emu = settings.emulator
            emulator = spawn_self([*config_args, "emulator"], env)
            children.append(emulator)
            _wait_http(f"http://{emu.host}:{emu.port}/healthz", emulator)
            env["PACS_EMBED_ENDPOINT__URL"] = f"http://{emu.host}:{emu.port}/score"
            env["PACS_EMBED_ENDPOINT__KEY_FILE"] = str(key_file)
        settings = _with_started(settings, env)
        workers = [spawn_self([*config_args, "worker"], env) for _ in range(settings.workers.count)]
        children.extend(workers)

        assert settings.redis.url is not None
        connection = redis.Redis.from_url(settings.redis.url)
        listener = Listener(settings, connection)
        listener.start()
        admin = admin_server(settings, connection)
        admin.start_in_thread()
        log.info(
            "run.ready",
            dicom_port=settings.listener.port,
            admin_port=settings.admin.port,
            workers=len(workers),
            state_dir=str(settings.state_dir),
        )
        return _supervise(stopping, children, workers, config_args, env)
    finally:
        log.info("run.stopping")
        if listener is not None:
            listener.stop()
        if admin is not None:
            admin.shutdown()
        for child in reversed(children):
            stop(child)
        if private_redis is not None:
            private_redis.stop()
        log.info("run.stopped")


def _supervise(
    stopping: threading.Event,
    children: list[subprocess.Popen[bytes]],
    workers: list[subprocess.Popen[bytes]],
    config_args: list[str],
    env: dict[str, str],
) -> int:
    """Restart a dead worker (after a pause); anything else dying stops the daemon."""
    while not stopping.wait(0.5):
        for i, worker in enumerate(workers):
            if worker.poll() is not None:
                log.error("worker.exited", pid=worker.pid, returncode=worker.returncode)
                time.sleep(1.0)
                workers[i] = spawn_self([*config_args, "worker"], env)
                children[children.index(worker)] = workers[i]
        for child in children:
            if child not in workers and child.poll() is not None:
                log.error("child.exited", pid=child.pid, returncode=child.returncode)
                return 1
    return 0


def _drop_stale_leases(url: str) -> None:
    """Endpoint leases left in our private Redis by a killed `run`: every holder is dead (only
    this daemon uses that Redis), so they would only block the slots until they expire."""
    connection = redis.Redis.from_url(url)
    stale = list(connection.scan_iter(match=INFLIGHT_PATTERN))
    if stale:
        connection.delete(*stale)
        log.info("run.stale_leases_dropped", keys=len(stale))


def _with_started(settings: Settings, env: dict[str, str]) -> Settings:
    """The settings this process uses, with what `run` started filled in."""
    if "PACS_EMBED_REDIS__URL" in env:
        redis_settings = settings.redis.model_copy(update={"url": env["PACS_EMBED_REDIS__URL"]})
        settings = settings.model_copy(update={"redis": redis_settings})
    if "PACS_EMBED_ENDPOINT__URL" in env:
        endpoint = settings.endpoint.model_copy(
            update={
                "url": env["PACS_EMBED_ENDPOINT__URL"],
                "key_file": Path(env["PACS_EMBED_ENDPOINT__KEY_FILE"]),
            }
        )
        settings = settings.model_copy(update={"endpoint": endpoint})
    return settings
