"""A local HTTP endpoint speaking the MedImageInsight scoring contract. NOT A MEDICAL MODEL.

Its embeddings come from ``emulator.model`` (a projected thumbnail, hashed words); they exist so
that pacs-embed can run and be tested without Azure. Every response says so in the
``x-pacs-embed-emulator: not-a-medical-model`` header and the start-up log line repeats it.

    POST /score    the request body of DESIGN §5; ``Authorization: Bearer <key>`` if a key is set
    GET  /healthz  200 while serving

Answers in the list-of-rows shape real deployments use (``response_shape="rows"``) or the
documentation's object of lists (``"columns"``). Faults are injected per request with the header
``x-emulator-fault: 429|503|500|408|413|malformed`` (``x-emulator-retry-after: <s>`` adds
``Retry-After`` to the error); ``malformed`` answers 200 with a truncated JSON body.
"""

from __future__ import annotations

import hmac
import json
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import structlog

from emulator import model

log = structlog.get_logger(__name__)

#: Response header naming what answered, so no one mistakes it for MedImageInsight.
EMULATOR_HEADER = "x-pacs-embed-emulator"
EMULATOR_HEADER_VALUE = "not-a-medical-model"

#: Request headers that inject a fault into that one request.
FAULT_HEADER = "x-emulator-fault"
FAULT_RETRY_AFTER_HEADER = "x-emulator-retry-after"

#: Faults by header value: the status answered and its message.
FAULTS: dict[str, tuple[int, str]] = {
    "408": (408, "injected fault: request timed out"),
    "413": (413, "injected fault: request entity too large"),
    "429": (429, "injected fault: too many requests"),
    "500": (500, "injected fault: internal server error"),
    "503": (503, "injected fault: service unavailable"),
    "malformed": (200, "injected fault: truncated body"),
}

#: Larger request bodies are refused with 413 without being read.
MAX_BODY_BYTES = 64 * 1024 * 1024

#: An idle keep-alive connection is closed after this many seconds.
IDLE_TIMEOUT_SECONDS = 60.0

RESPONSE_SHAPES = ("rows", "columns")


@dataclass
class EmulatorConfig:
    """Where the emulator listens and how it answers. ``port=0`` picks a free port."""

    host: str = "127.0.0.1"
    port: int = 8765
    key: str | None = None
    response_shape: str = "rows"
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.response_shape not in RESPONSE_SHAPES:
            raise ValueError(
                f"response_shape must be one of {RESPONSE_SHAPES}, got {self.response_shape!r}"
            )
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler; every answer has a Content-Length and the emulator header."""

    protocol_version = "HTTP/1.1"
    server_version = "pacs-embed-emulator"
    timeout = IDLE_TIMEOUT_SECONDS
    server: _HTTPServer

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/healthz":
            self._send_json(200, {"status": "ok", "model": "emulator, not a medical model"})
        else:
            self._send_json(404, {"message": f"no such path: {self.path[:100]}"})

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/score":
            self._discard_body()
            self._send_json(404, {"message": f"no such path: {self.path[:100]}"})
            return
        body = self._read_body()
        if body is None:
            return
        config = self.server.config
        if config.key is not None and not self._authorised(config.key):
            self._send_json(
                401,
                {"message": "missing or invalid key: send Authorization: Bearer <key>"},
                {"WWW-Authenticate": "Bearer"},
            )
            return
        if config.latency_ms:
            time.sleep(config.latency_ms / 1000.0)
        fault = self.headers.get(FAULT_HEADER)
        if fault is not None:
            self._send_fault(fault.strip().lower())
            return
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            self._send_json(400, {"message": f"body is not JSON: {exc}"})
            return
        try:
            answer = model.score(payload, config.response_shape)
        except model.BadRequest as exc:
            self._send_json(400, {"message": str(exc)})
            return
        self._send_json(200, answer)

    def _authorised(self, key: str) -> bool:
        given = self.headers.get("Authorization", "").encode("utf-8", "replace")
        return hmac.compare_digest(given, f"Bearer {key}".encode())

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 411/413 (and closing the connection)."""
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send_json(411, {"message": "a Content-Length header is required"})
            return None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send_json(413, {"message": f"body over {MAX_BODY_BYTES} bytes"})
            return None
        return self.rfile.read(length)

    def _discard_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        if 0 <= length <= MAX_BODY_BYTES:
            self.rfile.read(length)
        else:
            self.close_connection = True

    def _send_fault(self, fault: str) -> None:
        if fault not in FAULTS:
            self._send_json(
                400, {"message": f"unknown {FAULT_HEADER}: {fault[:40]!r}; one of {sorted(FAULTS)}"}
            )
            return
        status, message = FAULTS[fault]
        if fault == "malformed":
            self._send(200, b'[{"image_features": [[0.125, -0.25', "application/json")
            return
        headers = {}
        retry_after = self.headers.get(FAULT_RETRY_AFTER_HEADER)
        if retry_after is not None and status in (429, 503):
            headers["Retry-After"] = retry_after.strip()[:20]
        self._send_json(status, {"message": message}, headers)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self._send(status, body, "application/json", headers)

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header(EMULATOR_HEADER, EMULATOR_HEADER_VALUE)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("emulator.request", method=self.command, path=self.path[:100], status=code)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("emulator.http", message=format % args)


class _HTTPServer(ThreadingHTTPServer):
    """Threaded server that knows its open connections, so shutdown can close idle keep-alives."""

    daemon_threads = True

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__((config.host, config.port), _Handler)

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
    """The emulator's server: ``start_in_thread()`` in tests, ``serve_forever()`` in the CLI."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self._httpd = _HTTPServer(config)
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
            key_required=self.config.key is not None,
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

    def shutdown(self) -> None:
        """Stop serving, drop open keep-alive connections and close the listening socket."""
        if self._serving:
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
