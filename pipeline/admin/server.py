"""`pacs-embed admin`: serves the route table of ``pipeline.admin.routes`` with uvicorn.

It declares no route of its own: ``app`` turns the table into a Starlette application (404 off
the table, 401 without the bearer token, 503 when a handler raises, every error in JSON) and
``protocol`` is uvicorn's h11 protocol with the time and size bounds of ``limits.Limits``.

The listening socket is bound when the server is built, so a taken port fails there, and
``address`` is known at once (port 0 picks a free one). ``serve_forever`` serves in the calling
(main) thread until SIGTERM or SIGINT; ``start_in_thread`` / ``shutdown`` serve from a thread,
for a process that does other work (uvicorn then installs no signal handlers).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from types import FrameType

import structlog
import uvicorn

from pipeline.admin import app, protocol
from pipeline.admin.limits import Limits
from pipeline.admin.routes import Route

log = structlog.get_logger(__name__)

#: How long start_in_thread waits for the server to accept connections.
START_SECONDS = 10.0


class AdminServer:
    """The admin endpoint on ``host:port``: ``routes`` (path -> route), and nothing else."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        routes: Mapping[str, Route],
        limits: Limits | None = None,
    ) -> None:
        self.token = token
        self.routes = routes
        self.limits = limits or Limits()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family)
        self.address: tuple[str, int] = self._socket.getsockname()[:2]
        config = uvicorn.Config(
            app.build(routes, token, self.limits),
            http=protocol.protocol_class(self.limits),
            ws="none",  # no upgrades: an Upgrade header is ignored
            lifespan="off",
            loop="asyncio",
            log_config=None,  # the process's logging (pipeline.logs) stays as it is
            # Only uvicorn's errors: its start/stop lines are admin.started/stopped here, and its
            # warning on an unparsable request would repeat protocol's admin.refused.
            log_level="error",
            access_log=False,
            server_header=False,
            timeout_keep_alive=self.limits.keep_alive_seconds,
            timeout_graceful_shutdown=self.limits.shutdown_seconds,
            h11_max_incomplete_event_size=self.limits.max_head_bytes,
        )
        self._uvicorn = _Uvicorn(config)
        self._thread: threading.Thread | None = None
        self._served = False

    def serve_forever(self) -> None:
        """Serve in this thread until SIGTERM or SIGINT, then stop gracefully and return.

        Answers in progress get ``Limits.shutdown_seconds`` to finish; a second signal stops at
        once. Must be called from the main thread (signal handlers live there).
        """
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            self._serve()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def start_in_thread(self) -> None:
        """Serve from a daemon thread; returns once connections are accepted."""
        self._thread = threading.Thread(target=self._serve, name="admin", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not self._uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError("the admin server stopped while starting")
            if time.monotonic() > deadline:
                raise RuntimeError("the admin server did not start")
            self._thread.join(0.01)

    def shutdown(self) -> None:
        """Stop serving (graceful, as on SIGTERM) and close the socket; safe to call twice."""
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(self.limits.shutdown_seconds + 5)
        if not self._served:
            self._socket.close()  # uvicorn closes it when it has served

    def _serve(self) -> None:
        self._served = True
        log.info("admin.started", host=self.address[0], port=self.address[1])
        self._uvicorn.run(sockets=[self._socket])
        log.info("admin.stopped")

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        if self._uvicorn.should_exit:
            self._uvicorn.force_exit = True
        self._uvicorn.should_exit = True


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server without its signal handling: it would re-raise a caught SIGTERM after
    stopping, killing the process with status -15; ``serve_forever`` handles signals itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
