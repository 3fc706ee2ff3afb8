"""uvicorn's HTTP/1.1 protocol (h11) with the guards it lacks, answering its own errors in JSON.

What uvicorn's ``H11Protocol`` does by itself, and what this subclass adds:

- Keep-alive: uvicorn closes a connection idle for ``timeout_keep_alive`` after an answer. It arms
  that timer only once an answer is sent, and cancels it on the first byte of the next request, so
  a client that sends half a request line and stalls is never timed out. Added: a request
  deadline (``Limits.request_seconds``) from the connection's start and from each answer's end to
  the whole next request; past it the connection is closed, with a JSON 408 when part of a
  request came.
- Size: h11 refuses a request head that grows past ``max_incomplete_event_size`` (set to
  ``Limits.max_head_bytes``), and uvicorn answers any unparsable request with a text/plain 400.
  Here that answer is JSON, and 414 when the request line alone is too long, 431 when the head is.
  A head that arrives whole in one read is parsed by h11 whatever its size; ``app`` checks that.
- Connections: uvicorn accepts any number (``limit_concurrency`` answers 503 only once a request
  has arrived, in text/plain). Here a connection past ``Limits.max_connections`` is answered a
  JSON 503 and closed at once, so a flood of idle connections cannot exhaust descriptors.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any, ClassVar

import h11
import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.admin.app import error_body
from pipeline.admin.limits import Limits

log = structlog.get_logger(__name__)

#: The client's states in which its request is not yet whole: the request deadline applies.
_RECEIVING = (h11.IDLE, h11.SEND_BODY)


def protocol_class(limits: Limits) -> type[GuardedH11Protocol]:
    """The protocol class to hand uvicorn (it instantiates one per connection) for ``limits``."""

    class Bounded(GuardedH11Protocol):
        pass

    Bounded.limits = limits
    return Bounded


def error_response(status: int) -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection, for the cases where no request
    was parsed (so h11 cannot frame one): ``{"error": "<reason phrase>"}``."""
    body = error_body(status)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """One connection: uvicorn's h11 protocol plus the request deadline, the connection cap and
    JSON errors (see the module docstring)."""

    limits: ClassVar[Limits] = Limits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # registers it: connection_lost unregisters
        if len(self.connections) > self.limits.max_connections:
            self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections")
            return
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # refused: what still comes is dropped
        super().data_received(data)
        if self.conn.their_state not in _RECEIVING:
            self._disarm_deadline()  # the whole request is in: the handler's time is not theirs

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may already parse a pipelined request
        if not self.transport.is_closing() and self.conn.their_state in _RECEIVING:
            self._arm_deadline()

    def send_400_response(self, msg: str) -> None:
        """h11 could not parse the request: too long a line or head, or malformed."""
        pending = self.conn.trailing_data[0]
        if len(pending.split(b"\r\n", 1)[0]) > self.limits.max_url_bytes:
            status = HTTPStatus.REQUEST_URI_TOO_LONG
        elif len(pending) > self.limits.max_head_bytes:
            status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
        else:
            status = HTTPStatus.BAD_REQUEST
        self._refuse(status, msg, linger=True)

    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self._deadline = self.loop.call_later(self.limits.request_seconds, self._too_slow)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        """The request deadline passed. 408 only when part of a request came: on an idle
        keep-alive connection an unasked answer could be taken for the next request's."""
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in _RECEIVING:
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._refuse(HTTPStatus.REQUEST_TIMEOUT, "request not complete in time")
        else:
            self.transport.close()

    def _refuse(self, status: HTTPStatus, reason: str, *, linger: bool = False) -> None:
        """Answer ``status`` and close; with ``linger``, half-close first and drop what the
        client still sends for ``Limits.linger_seconds`` (see there)."""
        if self.transport.is_closing() or self._lingering:
            return
        log.warning("admin.refused", status=int(status), reason=reason, client=self.client)
        self.transport.write(error_response(status))
        if linger and self.transport.can_write_eof():
            self._disarm_deadline()
            self._lingering = True
            self.transport.write_eof()
            self.loop.call_later(self.limits.linger_seconds, self.transport.close)
        else:
            self.transport.close()
