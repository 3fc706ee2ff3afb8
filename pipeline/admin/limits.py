"""How long and how much one client of the admin endpoint may take, as one value object.

The admin endpoint answers probes and operators: small GET requests, a handful at a time. These
bounds keep a slow, broken or hostile client from holding sockets, threads or memory; each is the
smallest that a well-behaved client never meets. ``server.AdminServer`` hands them to uvicorn and
to ``protocol.GuardedH11Protocol`` (what uvicorn does not bound by itself).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Time and size bounds per connection and request; the defaults are what production uses."""

    #: From a connection's start, or from the end of its previous answer, to the whole next
    #: request (head and any body): past it the connection is closed (408 if some of the request
    #: came). uvicorn has no such timeout: a client that sends half a request line and stalls
    #: would otherwise hold its socket until it goes away.
    request_seconds: float = 5.0
    #: An idle keep-alive connection is closed after this (uvicorn's ``timeout_keep_alive``).
    keep_alive_seconds: int = 5
    #: On SIGTERM, answers in progress get this long to finish before their tasks are cancelled.
    shutdown_seconds: int = 5
    #: Bytes of the request target (path and query): past it 414. The longest real one, a
    #: /search with a 64-character UID and a cohort, is under 200.
    max_url_bytes: int = 4096
    #: Bytes of the request line and headers together: past it 431 (as nginx's default 8 KiB).
    max_head_bytes: int = 8192
    #: After refusing a request that is still arriving (400, 414, 431), the connection reads and
    #: drops for this long before closing: closing with unread data would send a TCP reset,
    #: which can destroy the refusal before the client reads it.
    linger_seconds: float = 2.0
    #: Bytes of a request body: past it 413. The only route that reads one, POST /requeue,
    #: takes a JSON object naming one thing (under 200 bytes).
    max_body_bytes: int = 4096
    #: Connections open at once: one more is answered 503 and closed. Without a cap a flood of
    #: connections, each held up to ``request_seconds``, could run the process out of descriptors.
    max_connections: int = 512
    #: Route handlers running at once, each on a worker thread (they block on Redis and disk);
    #: more requests wait for a free one, so the thread count stays bounded.
    max_handlers: int = 8
