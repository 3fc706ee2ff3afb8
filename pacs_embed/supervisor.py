"""Keep a set of child processes running: restart any that dies, with a growing pause.

Each child is a role (``redis``, ``emulator``, ``listener``, ``admin``, ``push``,
``worker-1``…) and a way to start it. A child that dies — a crash, an out-of-memory kill, a
``kill -9`` — is started again after :data:`FIRST_PAUSE_SECONDS`. A child that exits on its own
soon after it started (a port taken, a bad certificate) is retried at a pause doubling up to
:data:`MAX_PAUSE_SECONDS`, so a crash loop does not flood the log; one killed by a signal, or
that lived :data:`STABLE_SECONDS`, starts over at the first pause: a process killed from outside
was not failing, and making it wait longer only keeps senders out. The supervisor itself is meant to
be run by systemd or a container runtime, which restart it in turn.

Restarts happen on the thread that calls :meth:`Supervisor.watch` (the main thread), because
the children die with that thread (PR_SET_PDEATHSIG, see ``pacs_embed.processes``).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from pacs_embed.processes import stop

log = structlog.get_logger(__name__)

FIRST_PAUSE_SECONDS = 0.5
MAX_PAUSE_SECONDS = 30.0
#: A child that lived this long was healthy: its next death gets the first pause again.
STABLE_SECONDS = 30.0
#: How often the children are looked at.
POLL_SECONDS = 0.2

Process = subprocess.Popen[bytes]


@dataclass
class Child:
    """One supervised process. ``start`` spawns it; ``ready`` waits until it serves (used at
    the first start only, to start the others in order); ``on_exit`` runs when it died."""

    role: str
    start: Callable[[], Process]
    ready: Callable[[Process], None] = lambda _proc: None
    on_exit: Callable[[Process], None] = lambda _proc: None
    proc: Process | None = None
    started_at: float = 0.0
    short_lives: int = 0
    restart_at: float | None = None
    restarts: int = 0

    def spawn(self) -> None:
        self.proc = self.start()
        self.started_at = time.monotonic()
        self.restart_at = None


class Supervisor:
    """Starts children in order, restarts the dead, stops them in reverse order."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children

    def start(self) -> None:
        for child in self.children:
            child.spawn()
            assert child.proc is not None
            child.ready(child.proc)

    def watch(self, stopping: threading.Event) -> None:
        """Until ``stopping`` is set: notice deaths, restart when their pause is over."""
        while not stopping.wait(POLL_SECONDS):
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is None:
                    self._check(child, now)
                elif now >= child.restart_at:
                    self._restart(child)

    def _check(self, child: Child, now: float) -> None:
        proc = child.proc
        if proc is None or proc.poll() is None:
            return
        lived = now - child.started_at
        killed = proc.returncode < 0  # by a signal: the OOM killer, an operator, not a crash
        if lived >= STABLE_SECONDS or killed:
            child.short_lives = 0
        else:
            child.short_lives += 1
        pause = min(MAX_PAUSE_SECONDS, FIRST_PAUSE_SECONDS * 2 ** max(0, child.short_lives - 1))
        child.restart_at = now + pause
        log.error(
            "child.exited",
            role=child.role,
            pid=proc.pid,
            returncode=proc.returncode,
            lived_seconds=round(lived, 1),
            restart_in_seconds=pause,
        )
        try:
            child.on_exit(proc)
        except Exception:  # recovery is best effort; the restart still happens
            log.exception("child.on_exit_failed", role=child.role)

    def _restart(self, child: Child) -> None:
        try:
            child.spawn()
        except Exception:
            log.exception("child.start_failed", role=child.role)
            child.short_lives += 1
            child.restart_at = time.monotonic() + MAX_PAUSE_SECONDS
            return
        child.restarts += 1
        assert child.proc is not None
        log.info("child.restarted", role=child.role, pid=child.proc.pid, restarts=child.restarts)

    def stop(self) -> None:
        """SIGTERM each child, newest role first (workers finish their job; Redis last)."""
        for child in reversed(self.children):
            if child.proc is not None:
                stop(child.proc)
