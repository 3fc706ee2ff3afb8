"""A local HTTP endpoint speaking the MedImageInsight scoring contract. NOT A MEDICAL MODEL.

Its embeddings come from ``emulator.model`` (a projected thumbnail, hashed words); they exist so
that pacs-embed can run and be tested without Azure. Every response says so in the
``x-pacs-embed-emulator: not-a-medical-model`` header and the start-up log line repeats it.

    POST /score    the request body of docs/architecture.md §7;
                   ``Authorization: Bearer <key>`` if a key is set
    GET  /healthz  200 while serving (also during a cold start, as a liveness probe)
    GET  /stats    what was answered, and the most requests ever in flight (``faults.Stats``)
    POST /outage   ``{"seconds": s}``: every /score answers 503 (no Retry-After) for the next s
                   seconds, as a deployment that is down does (same key as /score); 0 ends it

Answers in the list-of-rows shape real deployments use (``response_shape="rows"``) or the
documentation's object of lists (``"columns"``). The server is configured by its ``[emulator]``
settings section as is (``EmulatorSettings``, a ``FaultPlan``: see ``emulator.faults``). Faults
come from that plan or, for one request, from headers: ``x-emulator-fault: 408|413|424|429|500|
503|hang|malformed``, ``x-emulator-retry-after: <s>`` (``Retry-After`` on a forced 429/503) and
``x-emulator-latency-ms: <ms>`` (replaces the plan's fixed latency). A request is checked in
this order: key (401), cold start (503), outage (503), capacity (429), fault, latency, then
scored.
"""

from __future__ import annotations

import random
import socket
import socketserver
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Any

import structlog

from emulator.faults import FaultPlan, Stats, draw
from emulator.handler import EMULATOR_HEADER, EMULATOR_HEADER_VALUE, Handler
from pipeline.sections import EmulatorSettings
from pipeline.settings import read_secret

__all__ = ["EMULATOR_HEADER", "EMULATOR_HEADER_VALUE", "EmulatorServer", "EmulatorSettings"]

log = structlog.get_logger(__name__)


class _HTTPServer(ThreadingHTTPServer):
    """Threaded server that knows its open connections, so shutdown can close idle keep-alives."""

    daemon_threads = True

    def __init__(self, config: EmulatorSettings, port: int) -> None:
        self.config = config
        self.key = read_secret(config.key, config.key_file)
        self.stats = Stats()
        self.stopping = threading.Event()
        self.started = time.monotonic()
        self.outage_until = 0.0  # monotonic time an outage asked by POST /outage ends
        self._rng = random.Random(config.seed)
        self._rng_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__((config.host, port), Handler)

    def cold(self) -> bool:
        """Whether the configured cold start is still going on."""
        return time.monotonic() - self.started < self.config.cold_start_seconds

    def down(self) -> bool:
        """Whether an outage asked by ``POST /outage`` is going on."""
        return time.monotonic() < self.outage_until

    def draw(self) -> str | None:
        """This request's random fault from the plan, if any."""
        with self._rng_lock:
            return draw(self.config, self._rng)

    def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the server stops."""
        if seconds > 0:
            self.stopping.wait(seconds)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on DNS; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The base prints a traceback to stderr; a client that timed out and hung up is routine.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("emulator.client_gone", error=type(error).__name__)
        else:
            log.exception("emulator.handler_failed")

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer


class EmulatorServer:
    """The emulator's server: ``start_in_thread()`` in tests, ``serve_forever()`` in the CLI.

    ``port`` replaces ``config.port``; 0 picks a free one (see :attr:`url`), as tests do.
    """

    def __init__(self, config: EmulatorSettings, *, port: int | None = None) -> None:
        self.config = config
        self._httpd = _HTTPServer(config, config.port if port is None else port)
        self._thread: threading.Thread | None = None
        self._serving = False

    @property
    def url(self) -> str:
        """The scoring URI, with the real port when 0 was asked for."""
        host, port = self._httpd.server_address[:2]
        host = str(host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/score"

    def serve_forever(self) -> None:
        """Serve in this thread until ``shutdown()`` is called from another."""
        self._serving = True
        log.warning(
            "emulator.listening",
            url=self.url,
            response_shape=self.config.response_shape,
            key_required=self._httpd.key is not None,
            faults={
                key: value for key in FaultPlan.model_fields if (value := getattr(self.config, key))
            },
            notice="NOT a medical model: embeddings are deterministic functions of pixels and "
            "words, for testing pacs-embed only",
        )
        self._httpd.serve_forever(poll_interval=0.1)

    def start_in_thread(self) -> None:
        """Serve from a daemon thread; returns once the socket accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the emulator is already serving")
        self._serving = True
        self._thread = threading.Thread(target=self.serve_forever, name="emulator", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> Stats:
        """What this server has answered so far."""
        return self._httpd.stats

    def shutdown(self) -> None:
        """Stop serving, drop open keep-alive connections and close the listening socket."""
        self._httpd.stopping.set()
        # socketserver's shutdown() waits for serve_forever() to acknowledge: never ask a thread
        # that already died (e.g. its start-up log line raised), or we would wait forever.
        if self._serving and (self._thread is None or self._thread.is_alive()):
            self._httpd.shutdown()
        self._serving = False
        self._httpd.close_connections()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> EmulatorServer:
        self.start_in_thread()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()
