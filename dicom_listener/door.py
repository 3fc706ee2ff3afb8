"""The listener's door: who may hold a connection and an association slot, on both ports.

pynetdicom alone lets idle connections shut every sender out: each connection takes an
association slot from accept, before the calling-AE check, for its 30 s ACSE timeout, and can be
reopened forever. So (docs/architecture.md §4):

- a connection must finish its TLS handshake (TLS port) and then send its A-ASSOCIATE-RQ, each
  within ``listener.association_request_timeout_seconds``, else it is closed; one still dripping
  a PDU at twice that is cut off;
- association slots (``max_associations``) are held from an accepted request to the end of its
  association (:func:`dicom_listener.handlers.handle_requested` claims them); past them a request
  gets A-ASSOCIATE-RJ "local limit exceeded" (transient), which senders retry;
- connections are counted per peer address from accept to close; past
  ``max_connections_per_peer`` a new one is closed at once.

Every refusal is logged with the address and counts, and recorded in the intake log. The
associations holding slots are what /status ``associations`` lists (:meth:`Doorman.held`).
"""

from __future__ import annotations

import re
import socket
import socketserver
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import structlog
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_listener.handlers import end_request_wait, refuse_connection
from pipeline.errors import ConfigError
from pipeline.intake import IntakeLog, printable
from pipeline.sections import ListenerSettings

log = structlog.get_logger(__name__)

#: How long stop() waits for the connections it ended (a C-STORE handler finishing its write).
STOP_GRACE_SECONDS = 10.0

#: An OpenSSL reason code ("PEER_DID_NOT_RETURN_A_CERTIFICATE"): a fixed vocabulary, safe to show.
_SSL_REASON = re.compile(r"[A-Z0-9_]{1,64}")


def tls_context(lsn: ListenerSettings) -> ssl.SSLContext:
    """The TLS port's server context: TLS 1.2 or later, our certificate, and with ``tls_ca_file``
    client certificates required and verified against it. A file that cannot be used is a
    ConfigError naming its setting."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cast(Path, lsn.tls_cert_file), cast(Path, lsn.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"listener.tls_cert_file / tls_key_file: cannot load {lsn.tls_cert_file} with "
            f"{lsn.tls_key_file}: {exc}"
        ) from exc
    if lsn.tls_ca_file is not None:
        try:
            context.load_verify_locations(cafile=lsn.tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"listener.tls_ca_file: cannot load {lsn.tls_ca_file}: {exc}"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Doorman:
    """What both ports share: open connections per peer address, and association slots."""

    def __init__(self, lsn: ListenerSettings) -> None:
        self.max_connections_per_peer = lsn.max_connections_per_peer
        self.max_associations = lsn.max_associations
        self._lock = threading.Lock()
        self._connections: Counter[str] = Counter()
        self._associations: dict[Association, _Held] = {}

    def admit(self, address: str) -> tuple[bool, int]:
        """Count a connection from ``address`` unless it already has its maximum; with the
        count it would have (refused) or has (admitted)."""
        with self._lock:
            if self._connections[address] >= self.max_connections_per_peer:
                return False, self._connections[address] + 1
            self._connections[address] += 1
            return True, self._connections[address]

    def leave(self, address: str) -> None:
        with self._lock:
            self._connections[address] -= 1
            if self._connections[address] <= 0:
                del self._connections[address]

    def claim(self, assoc: Association) -> tuple[bool, int]:
        """A slot for this association unless all are held; with the count of held slots."""
        with self._lock:
            if len(self._associations) >= self.max_associations:
                return False, len(self._associations)
            self._associations[assoc] = _Held(time.time())
            return True, len(self._associations)

    def release(self, assoc: Association) -> None:
        with self._lock:
            self._associations.pop(assoc, None)

    def stored(self, assoc: Association) -> None:
        """One more instance stored on this association."""
        with self._lock:
            held = self._associations.get(assoc)
            if held is not None:
                held.instances += 1

    def held(self) -> list[dict[str, object]]:
        """The associations holding slots, oldest first: calling AE title, peer address, since
        (unix seconds) and instances stored on each (for the listener's health report)."""
        with self._lock:
            rows = list(self._associations.items())
        out: list[dict[str, object]] = []
        for assoc, held in sorted(rows, key=lambda row: row[1].since):
            request = assoc.requestor.primitive
            calling = request.calling_ae_title if request is not None else ""
            out.append(
                {
                    "calling_ae": printable(calling, 16),
                    "address": printable(str(assoc.requestor.address)),
                    "since": round(held.since, 3),
                    "instances": held.instances,
                }
            )
        return out

    def connections(self, address: str) -> int:
        with self._lock:
            return self._connections[address]


class DoorServer(ThreadedAssociationServer):
    """pynetdicom's server, each connection in a thread of ours from accept to close: counted per
    peer, its TLS handshake done there (pynetdicom's does it in the accept loop, where one silent
    client stalls every other), its association run to the end and its slot given back."""

    daemon_threads = True
    #: The listen backlog (socketserver's is 5): a burst of connections, while the accept loop
    #: waits for the GIL, is queued by the kernel instead of dropped into 1 s SYN retries.
    request_queue_size = socket.SOMAXCONN

    def __init__(  # as AE.make_server(..., server_class=DoorServer, doorman=...) calls it
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        doorman: Doorman,
        intake: IntakeLog,
        request_timeout: float,
        reuse_port: bool = False,
    ) -> None:
        self.doorman = doorman
        self.intake = intake
        self.request_timeout = request_timeout
        self.reuse_port = reuse_port
        self.stopping = False  # connections ended by shutdown() are not refusals
        self._open: dict[threading.Thread, _Open] = {}
        self._open_lock = threading.Lock()
        super().__init__(
            ae, address, ae_title, contexts, ssl_context, evt_handlers, _WholeConnection
        )

    def server_bind(self) -> None:
        """pynetdicom's bind, and with ``reuse_port`` (``listener.processes`` > 1) SO_REUSEPORT,
        so the node's listener processes share the port and the kernel spreads connections over
        them. Only then: with it, a second daemon started on the same port by mistake would
        silently take half the associations instead of failing to start."""
        if self.reuse_port:
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = cast(socket.socket, self.socket).accept()
        if self.ssl_context:
            try:
                sock = self.ssl_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            except OSError:
                sock.close()
                raise
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        admitted, count = self.doorman.admit(str(client_address[0]))
        thread = threading.Thread(
            target=self._connection,
            args=(request, client_address, admitted, count),
            name=f"DicomConnection@{client_address[0]}",
            daemon=True,
        )
        with self._open_lock:
            self._open[thread] = _Open(request)
        thread.start()

    def _connection(
        self, request: socket.socket, client_address: Any, admitted: bool, count: int
    ) -> None:
        address = str(client_address[0])
        try:
            if not admitted:
                limit = self.doorman.max_connections_per_peer
                reason = "too many connections from this address"
                self.refuse(reason, address, connections=count, limit=limit)
                return
            request.settimeout(self.request_timeout)
            if isinstance(request, ssl.SSLSocket) and not self._handshake(request, address):
                return
            self.finish_request(request, client_address)
        except Exception:
            log.exception("listener.connection_error", address=address)
        finally:
            self.shutdown_request(request)
            if admitted:
                self.doorman.leave(address)
            with self._open_lock:
                self._open.pop(threading.current_thread(), None)

    def refuse(self, reason: str, address: str, **counts: int) -> None:
        if not self.stopping:
            refuse_connection(self.intake, reason, address, **counts)

    def _handshake(self, request: ssl.SSLSocket, address: str) -> bool:
        try:
            request.do_handshake()
            return True
        except TimeoutError:
            reason = f"TLS handshake not completed within {self.request_timeout:g} s"
        except (OSError, ValueError) as exc:  # ssl.SSLError, a reset, a socket closed meanwhile
            code = str(getattr(exc, "reason", None) or "")
            code = code if _SSL_REASON.fullmatch(code) else type(exc).__name__
            reason = f"TLS handshake failed ({code})"
        self.refuse(reason, address, connections=self.doorman.connections(address))
        return False

    def shutdown(self) -> None:
        """Stop accepting, then end every open connection and wait for it to finish (at most
        STOP_GRACE_SECONDS): an association cut short is aborted, and its sender resends what
        was not acknowledged. (Not pynetdicom's shutdown: the AE does not list this server.)"""
        socketserver.BaseServer.shutdown(self)  # ends serve_forever
        self.server_close()
        self.stopping = True
        with self._open_lock:
            still_open = list(self._open.items())
        for _, connection in still_open:
            connection.end()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for thread, _ in still_open:
            thread.join(max(0.0, deadline - time.monotonic()))

    def running(self, assoc: Association) -> None:
        """The current connection's association, so that shutdown() can end its wait."""
        with self._open_lock:
            self._open[threading.current_thread()].assoc = assoc

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("listener.connection_error", address=str(client_address[0]))


class _WholeConnection(RequestHandler):
    """Runs the connection's association to its end (pynetdicom's handler only starts it)."""

    server: DoorServer

    def handle(self) -> None:
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        server = self.server
        server.running(assoc)
        started = time.monotonic()
        try:
            assoc.start()
            assoc.join(2 * server.request_timeout)
            if assoc.is_alive() and assoc.requestor.primitive is None:
                # Still no request: a peer dripping a PDU, which the socket timeout (per read)
                # does not end. Cutting the socket ends the read, and the association.
                _cut(self.request)
            assoc.join()
        finally:
            server.doorman.release(assoc)
        if assoc.requestor.primitive is None:
            # Silent until the timeout; or, sooner, hung up or sent what is not an A-ASSOCIATE-RQ
            # (pynetdicom's DUL answered that with an A-ABORT, PS3.8's answer to an invalid PDU).
            address = str(self.client_address[0])
            if time.monotonic() - started >= server.request_timeout:
                reason = f"no association request within {server.request_timeout:g} s"
            else:
                reason = "no decodable association request"
            server.refuse(reason, address, connections=server.doorman.connections(address))


@dataclass
class _Held:
    """An association holding a slot: since when, and how many instances it stored."""

    since: float
    instances: int = 0


@dataclass
class _Open:
    """An open connection: its socket, and its association once there is one."""

    sock: socket.socket
    assoc: Association | None = None

    def end(self) -> None:
        _cut(self.sock)  # an association ends on the closed transport (A-P-ABORT) ...
        if self.assoc is not None and self.assoc.requestor.primitive is None:
            end_request_wait(self.assoc)  # ... the wait for a request only when woken


def _cut(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the TCP socket, also under TLS
    except OSError:
        pass
