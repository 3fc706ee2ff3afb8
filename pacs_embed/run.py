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
from typing import Any

import redis
import structlog

from pacs_embed.compose import Root, child_env, emulator_base_url, local_emulator
from pacs_embed.processes import PrivateRedis, spawn_self, stop
from pacs_embed.secrets import ensure_secret_file
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


def run(settings: Settings, config: Path | None) -> int:
    """``settings``: as loaded from ``config`` and the environment, before anything started.

    What `run` starts is recorded once, as overrides: this process's settings are
    ``Settings.load(config, **overrides)`` and its children get the same overrides as env vars
    (``child_env``), so both read the same values the same way.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    config_args = ["--config", str(config)] if config else []
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())

    overrides: dict[str, Any] = {"state_dir": settings.state_dir}
    private_redis = connection = None
    children: list[subprocess.Popen[bytes]] = []
    root = None
    listener = admin = None
    try:
        if settings.redis.url is None:
            private_redis = PrivateRedis(settings.state_dir / "redis")
            overrides["redis"] = {"url": private_redis.start()}
            connection = redis.Redis.from_url(overrides["redis"]["url"])
            _drop_stale_leases(connection)
        if settings.endpoint.url is None:
            overrides.update(local_emulator(settings))
            if "emulator" in overrides:  # no emulator key set: generate one
                ensure_secret_file(overrides["emulator"]["key_file"])
            emulator = spawn_self([*config_args, "emulator"], child_env(overrides))
            children.append(emulator)
            _wait_http(f"{emulator_base_url(settings)}/healthz", emulator)
            log.info("labels.disabled", reason="the local emulator is not a vision-language model")
        settings = Settings.load(config, **overrides)
        env = child_env(overrides)
        workers = [spawn_self([*config_args, "worker"], env) for _ in range(settings.workers.count)]
        children.extend(workers)

        root = Root(settings, connection)  # connection None: the configured Redis
        listener = root.listener
        listener.start()
        admin = root.admin
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
        if root is not None:
            root.close()
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


def _drop_stale_leases(connection: redis.Redis) -> None:
    """Endpoint leases left in our private Redis by a killed `run`: every holder is dead (only
    this daemon uses that Redis), so they would only block the slots until they expire."""
    stale = list(connection.scan_iter(match=INFLIGHT_PATTERN))
    if stale:
        connection.delete(*stale)
        log.info("run.stale_leases_dropped", keys=len(stale))
