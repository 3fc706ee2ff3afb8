"""`pacs-embed run`: the whole daemon on one machine, in the foreground, supervised.

Every part is its own child process — a private Redis under the state dir and the local endpoint
(emulator) when none is configured, then the node's dispatcher (conversion, enqueue), its
listener processes (``listener.processes``, sharing the DICOM port), the admin endpoint, the push
service (study completion, result pushes, spool retention) and the embed workers —
so a crash of one never takes another with it, and each is restarted when it dies
(``pacs_embed.supervisor``): Redis from its append-only file, a listener (its dispatcher then
reconciles the spool), a worker after its job was handed back to the queue. Ctrl-C (or SIGTERM)
stops everything in reverse order. (docs/architecture.md §2.)
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import structlog
from rq import Queue

from pacs_embed.compose import child_env, connect, emulator_base_url, local_emulator, node_name
from pacs_embed.processes import PrivateRedis, spawn_self
from pacs_embed.secrets import ensure_secret_file
from pacs_embed.supervisor import Child, Process, Supervisor
from pipeline.health import PUSHER, WORKER
from pipeline.jobs import EMBED_QUEUE, push_queue
from pipeline.keys import INFLIGHT_PATTERN
from pipeline.settings import Settings
from workers.janitor import name_of, reap

log = structlog.get_logger(__name__)

#: How long a first start may take before `run` gives up (Redis loading a large append-only
#: file, a slow disk under the spool).
START_TIMEOUT_SECONDS = 120.0


def run(settings: Settings, config: Path | None) -> int:
    """``settings``: as loaded from ``config`` and the environment, before anything started.

    What `run` starts is recorded once, as overrides: its children get them as env vars
    (``child_env``), so every process reads the same values the same way.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    config_args = ["--config", str(config)] if config else []
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())

    overrides: dict[str, Any] = {"state_dir": settings.state_dir}
    children: list[Child] = []
    private_redis = None
    if settings.redis.url is None:
        private_redis = PrivateRedis(settings.state_dir / "redis")
        children.append(Child("redis", private_redis.spawn, _redis_ready(private_redis)))
        overrides["redis"] = {"url": private_redis.url}
    if settings.endpoint.url is None:
        overrides.update(local_emulator(settings))
        if "emulator" in overrides:  # no emulator key set: generate one
            ensure_secret_file(overrides["emulator"]["key_file"])
    env = child_env(overrides)

    def role(command: str) -> Callable[[], Process]:
        return lambda: spawn_self([*config_args, command], env)

    if settings.endpoint.url is None:
        health = f"{emulator_base_url(settings)}/healthz"
        children.append(Child("emulator", role("emulator"), lambda p: _wait_http(health, p)))
        log.info("labels.disabled", reason="the local emulator is not a vision-language model")
    settings = Settings.load(config, **overrides)
    connection = connect(settings)  # the private Redis's URL or the configured one
    lsn, adm = settings.listener, settings.admin
    children.append(Child("dispatcher", role("dispatch")))
    for name in _listener_names(lsn.processes):
        ready = lambda p: _wait(lambda: _listening(lsn.port), p, "DICOM")  # noqa: E731
        children.append(Child(name, role("listen"), ready))
    admin_url = f"http://{_local(adm.host)}:{adm.port}/healthz"
    children.append(Child("admin", role("admin"), lambda p: _wait_http(admin_url, p)))
    pushes = push_queue(node_name(settings.state_dir))
    children.append(Child("push", role("push"), on_exit=_requeuer(connection, pushes, PUSHER)))
    for i in range(settings.workers.count):
        on_exit = _requeuer(connection, EMBED_QUEUE, WORKER)
        children.append(Child(f"worker-{i + 1}", role("worker"), on_exit=on_exit))

    supervisor = Supervisor(children)
    try:
        supervisor.start()
        log.info(
            "run.ready",
            dicom_port=lsn.port,
            admin_port=adm.port,
            workers=settings.workers.count,
            state_dir=str(settings.state_dir),
        )
        supervisor.watch(stopping)
        return 0
    finally:
        log.info("run.stopping")
        supervisor.stop()
        if private_redis is not None:
            private_redis.forget()
        log.info("run.stopped")


def _listener_names(processes: int) -> list[str]:
    """``listener``, or ``listener-1`` … when several share the port."""
    if processes == 1:
        return ["listener"]
    return [f"listener-{i + 1}" for i in range(processes)]


def _requeuer(
    connection: redis.Redis, queue_name: str, component: str
) -> Callable[[Process], None]:
    """What `run` does the moment a worker dies: hand its job back to the queue and free its
    endpoint slot, without waiting for its report to lapse (``workers.janitor``)."""

    def requeue(proc: Process) -> None:
        dead = name_of(proc.pid)
        queue = Queue(queue_name, connection=connection)
        try:
            n = reap(connection, queue, dead=dead.__eq__, component=component)
        except redis.RedisError as exc:  # Redis away too: the janitors will do it later
            log.warning("run.requeue_failed", worker=dead, error=type(exc).__name__)
            return
        log.info("run.worker_jobs_requeued", worker=dead, queue=queue_name, jobs=n)

    return requeue


def _local(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 - a bind, not a listen


def _wait(ok: Callable[[], bool], proc: Process, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not ok():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not serving after {START_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.05)


def _wait_http(url: str, proc: Process) -> None:
    def ok() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - our own URL
                return bool(response.status == 200)
        except OSError:
            return False

    _wait(ok, proc, url)


def _listening(port: int) -> bool:
    """Whether a socket on this host listens on TCP ``port``, seen in /proc/net without
    connecting (a probe connection would show up as a rejected association)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _redis_ready(private: PrivateRedis) -> Callable[[Process], None]:
    """Wait for the private Redis, and (at the first start only) drop the leases that a killed
    `run` left in it."""

    def ready(proc: Process) -> None:
        private.wait(proc)
        _drop_stale_leases(redis.Redis.from_url(private.url))

    return ready


def _drop_stale_leases(connection: redis.Redis) -> None:
    """Endpoint leases left in our private Redis by a killed `run`: every holder is dead (only
    this daemon uses that Redis), so they would only block the slots until they expire."""
    stale = list(connection.scan_iter(match=INFLIGHT_PATTERN))
    if stale:
        connection.delete(*stale)
        log.info("run.stale_leases_dropped", keys=len(stale))
