"""The emulator's request handler: key, cold start, outage, capacity, faults, latency, then the
model.

NOT A MEDICAL MODEL: the answers come from ``emulator.model``. See ``emulator.server`` for the
routes and headers, and ``emulator.faults`` for what can go wrong on purpose.
"""

from __future__ import annotations

import hmac
import json
import select
import socket
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

import structlog

from emulator import model
from emulator.faults import (
    FAULTS,
    MODEL_ERROR_HEADERS,
    RETRY_AFTER_STATUSES,
    TRUNCATED_BODY,
    FaultPlan,
)

if TYPE_CHECKING:
    from emulator.server import _HTTPServer

log = structlog.get_logger(__name__)

#: Response header naming what answered, so no one mistakes it for MedImageInsight.
EMULATOR_HEADER = "x-pacs-embed-emulator"
EMULATOR_HEADER_VALUE = "not-a-medical-model"

#: Request headers that change that one request.
FAULT_HEADER = "x-emulator-fault"
FAULT_RETRY_AFTER_HEADER = "x-emulator-retry-after"
LATENCY_HEADER = "x-emulator-latency-ms"

#: Larger request bodies are refused with 413 without being read.
MAX_BODY_BYTES = 64 * 1024 * 1024

#: An idle keep-alive connection is closed after this many seconds.
IDLE_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    images: int = 0  # image rows embedded in this answer


def _json_reply(
    status: int, obj: Any, headers: dict[str, str] | None = None, images: int = 0
) -> _Reply:
    return _Reply(status, json.dumps(obj, separators=(",", ":")).encode(), headers or {}, images)


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler; every answer has a Content-Length and the emulator header."""

    protocol_version = "HTTP/1.1"
    server_version = "pacs-embed-emulator"
    timeout = IDLE_TIMEOUT_SECONDS
    server: _HTTPServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send_json(200, {"status": "ok", "model": "emulator, not a medical model"})
        elif path == "/stats":
            self._send_json(200, self.server.stats.snapshot())
        else:
            self._send_json(404, {"message": f"no such path: {self.path[:100]}"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/score", "/outage"):
            self._discard_body()
            self._send_json(404, {"message": f"no such path: {self.path[:100]}"})
            return
        body = self._read_body()
        if body is None:
            return
        key = self.server.key
        if key is not None and not self._authorised(key):
            message = {"message": "missing or invalid key: send Authorization: Bearer <key>"}
            reply: _Reply | None = _json_reply(401, message, {"WWW-Authenticate": "Bearer"})
        elif path == "/outage":  # a control, not an answer to count
            self._send(self._outage(body))
            return
        else:
            reply = self._score(body)
        if reply is None:
            self._hang()
            return
        self.server.stats.answered(reply.status, reply.images)
        self._send(reply)

    def _score(self, body: bytes) -> _Reply | None:
        """The answer to an authorised request, or None to hang."""
        arrived = time.monotonic()
        server = self.server
        plan = server.config
        if server.cold():
            server.stats.fault("cold_start")
            return self._error(503, "model is starting (cold start); retry later")
        if server.down():  # a deployment that is down says nothing about when to come back
            server.stats.fault("outage")
            return _json_reply(503, {"message": "injected outage: no healthy upstream"})
        if not server.stats.enter(plan.capacity):
            return self._error(
                429, f"too many requests in flight (capacity {plan.capacity}); retry later"
            )
        try:  # in flight until the answer is ready: leave() comes before the client can see it
            forced = self.headers.get(FAULT_HEADER)
            fault = forced.strip().lower() if forced is not None else server.draw()
            if fault is not None:
                return self._fault(fault)
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                return _json_reply(400, {"message": f"body is not JSON: {exc}"})
            images = _image_rows(payload)
            try:
                answer = model.score(payload, server.config.response_shape)
                reply = _json_reply(200, answer, images=images)
            except model.BadRequest as exc:
                reply = _json_reply(400, {"message": str(exc)})
            # Like inference time, the latency includes the work just done.
            server.pause(self._latency(plan, images) - (time.monotonic() - arrived))
            return reply
        finally:
            server.stats.leave()

    def _outage(self, body: bytes) -> _Reply:
        """``POST /outage {"seconds": s}``: /score answers 503 for the next ``s`` seconds."""
        try:
            seconds = float(json.loads(body)["seconds"])
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return _json_reply(400, {"message": 'body must be {"seconds": <number>}'})
        if not 0.0 <= seconds <= 86400.0:
            return _json_reply(400, {"message": "seconds must be between 0 and 86400"})
        self.server.outage_until = time.monotonic() + seconds
        log.warning("emulator.outage", seconds=seconds)
        return _json_reply(200, {"outage_seconds": seconds})

    def _fault(self, fault: str) -> _Reply | None:
        if fault not in FAULTS:
            message = f"unknown {FAULT_HEADER}: {fault[:40]!r}; one of {sorted(FAULTS)}"
            return _json_reply(400, {"message": message})
        self.server.stats.fault(fault)
        status, message = FAULTS[fault]
        if fault == "hang":
            return None
        if fault == "malformed":
            return _Reply(200, TRUNCATED_BODY)
        if fault == "424":
            return _json_reply(status, {"message": message}, dict(MODEL_ERROR_HEADERS))
        return self._error(status, message)

    def _error(self, status: int, message: str) -> _Reply:
        headers = {}
        if status in RETRY_AFTER_STATUSES:
            forced = self.headers.get(FAULT_RETRY_AFTER_HEADER)
            planned = self.server.config.retry_after_seconds
            if forced is not None:
                headers["Retry-After"] = forced.strip()[:20]
            elif planned is not None:
                headers["Retry-After"] = f"{planned:g}"
        return _json_reply(status, {"message": message}, headers)

    def _latency(self, plan: FaultPlan, images: int) -> float:
        forced = self.headers.get(LATENCY_HEADER)
        fixed = plan.latency_ms
        if forced is not None:
            try:
                fixed = max(0.0, float(forced))
            except ValueError:
                pass
        return (fixed + plan.latency_per_image_ms * images) / 1000.0

    def _hang(self) -> None:
        """Answer nothing until the client hangs up, ``hang_seconds`` pass, or the server stops."""
        self.close_connection = True
        deadline = time.monotonic() + self.server.config.hang_seconds
        sock = self.connection
        while time.monotonic() < deadline and not self.server.stopping.is_set():
            readable, _, _ = select.select([sock], [], [], 0.05)
            if not readable:
                continue
            try:
                if not sock.recv(1, socket.MSG_PEEK):
                    return  # the client gave up and closed the connection
            except OSError:
                return
            self.server.pause(0.05)  # the client sent more: keep ignoring it

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

    def _send_json(self, status: int, obj: Any) -> None:
        self._send(_json_reply(status, obj))

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header(EMULATOR_HEADER, EMULATOR_HEADER_VALUE)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("emulator.request", method=self.command, path=self.path[:100], status=code)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("emulator.http", message=format % args)


def _image_rows(payload: Any) -> int:
    """Rows of a (valid) request that carry an image; 0 when the body is not a valid request."""
    try:
        columns = payload["input_data"]["columns"]
        index = columns.index("image")
        return sum(1 for row in payload["input_data"]["data"] if row[index])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return 0
