"""Wiring for one listener process: the pynetdicom SCP on ``listener.port`` and, with TLS, also
on ``listener.tls_port`` (one AE, one set of handlers, the door of :mod:`.door` on each), the
spool it writes and the arrival log that hands each instance to the node's dispatcher, which
runs in a process of its own (:mod:`.dispatch_host`). Several listener processes may share the
ports (``listener.processes``)."""

from __future__ import annotations

import ssl
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import redis
import structlog
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_listener.arrivals import ArrivalLog
from dicom_listener.door import Doorman, DoorServer, tls_context
from dicom_listener.handlers import (
    handle_accepted,
    handle_conn_close,
    handle_echo,
    handle_rejected,
    handle_released,
    handle_requested,
    handle_store,
)
from dicom_listener.sop_classes import accept_unknown, storage_sop_classes
from dicom_listener.spool import Spool
from dicom_listener.status import StoreStatus
from pipeline import health
from pipeline.convert import DECODABLE_TRANSFER_SYNTAXES
from pipeline.intake import IntakeLog
from pipeline.keys import DEFAULT_NODE
from pipeline.settings import Settings
from pipeline.stage_metrics import ListenerMetrics

log = structlog.get_logger(__name__)

#: What we accept: every syntax the conversion decodes (uncompressed, deflated, big endian, JPEG,
#: JPEG-LS, JPEG 2000, RLE), so nothing is accepted that would only be quarantined later.
TRANSFER_SYNTAXES = list(DECODABLE_TRANSFER_SYNTAXES)

#: How often the listener publishes its health (open associations) and flushes its counts.
REPORT_SECONDS = 2.0


def _any_uid(_value: object) -> tuple[bool, str]:
    return True, ""


# pynetdicom refuses a command whose UID is over 64 characters by aborting the association
# without a response, logging the value three times. The C-STORE handler checks UIDs itself and
# answers 0xC000 (and its log never quotes them), so pynetdicom's own check is turned off.
_config.VALIDATORS["UI"] = _any_uid


class Gate:
    """Back-pressure for the C-STORE handler: low disk or a deep backlog -> 0xA700."""

    def __init__(self, spool: Spool, arrivals: ArrivalLog, min_free_bytes: int, max_backlog: int):
        self.spool = spool
        self.arrivals = arrivals
        self.min_free_bytes = min_free_bytes
        self.max_backlog = max_backlog

    def refuse_reason(self) -> str | None:
        if self.spool.free_bytes() < self.min_free_bytes:
            return "free disk under the watermark"
        if self.arrivals.backlog() >= self.max_backlog:
            return "backlog over its bound"
        return None


#: pynetdicom's own limit counts connections, idle ones included, when a request arrives; the
#: Doorman counts associations instead, so pynetdicom's is set out of reach.
_PYNETDICOM_LIMIT_OFF = 2**31 - 1


def build_ae(settings: Settings) -> AE:
    lsn = settings.listener
    ae = AE(ae_title=lsn.ae_title)
    ae.maximum_pdu_size = lsn.max_pdu_bytes
    ae.maximum_associations = _PYNETDICOM_LIMIT_OFF
    # The wait for the A-ASSOCIATE-RQ and the ARTIM timer. pynetdicom uses it also for an
    # A-RELEASE-RP to a release we request (never, as an SCP) and as a requestor (never).
    ae.acse_timeout = lsn.association_request_timeout_seconds
    ae.require_calling_aet = list(lsn.allowed_calling_aets)
    ae.require_called_aet = lsn.require_called_aet
    for sop_class in storage_sop_classes():
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def data_set_bytes(event: Event) -> int:
    """The length of a C-STORE's data set as received (0 when there is none in memory)."""
    data = cast(C_STORE, event.request).DataSet
    if not isinstance(data, BytesIO):
        return 0
    with data.getbuffer() as view:
        return view.nbytes


class Listener:
    """One listener process: start() cleans its partial writes, asks the node's dispatcher to
    reconcile the spool (with its first write), and accepts associations."""

    def __init__(
        self, settings: Settings, connection: redis.Redis, node: str = DEFAULT_NODE
    ) -> None:
        """``node``: this listener's name among the fleet's (its state dir's)."""
        self.settings = settings
        self.connection = connection
        self.node = node
        self._stopping = threading.Event()
        self.spool = Spool(settings.spool_dir, settings.quarantine_dir)
        self.intake = IntakeLog(connection)
        #: C-STOREs, bytes, associations accepted: counted in memory, written to Redis every
        #: few seconds (so an answer never waits for Redis) and at stop.
        self.metrics = ListenerMetrics(connection)
        self.arrivals = ArrivalLog(connection, node)
        self.doorman = Doorman(settings.listener)
        self.started = time.time()
        self.gate = Gate(
            self.spool,
            self.arrivals,
            settings.listener.min_free_disk_mb * 1024 * 1024,
            settings.listener.max_backlog,
        )
        self.servers: list[DoorServer] = []

    def _received(self, path: Path) -> None:
        self.arrivals.add(Spool.uid_of(path))

    def _store(self, event: Event) -> int:
        """EVT_C_STORE: :func:`handle_store`, counting each instance stored per association,
        and every answer by status with its data set's bytes (in memory)."""
        status = handle_store(
            event, self.spool, self.gate, self._received, self.intake, self.metrics.spooled
        )
        if status == StoreStatus.SUCCESS:
            self.doorman.stored(event.assoc)
        self.metrics.stored(status, data_set_bytes(event))
        return status

    def _report(self) -> None:
        """Every few seconds: this process's open associations (/status ``associations``) with
        when it started (``uptime_seconds``), and its counts."""
        while not self._stopping.wait(REPORT_SECONDS):
            listener = {
                "since": self.started,
                "associations": self.doorman.held(),
                "at": time.time(),
            }
            health.publish(self.connection, health.LISTENER, listener)
            self.metrics.flush()

    def start(self) -> None:
        lsn = self.settings.listener
        ports: list[tuple[int, ssl.SSLContext | None]] = [(lsn.port, None)]
        if lsn.tls_port is not None:
            ports.append((lsn.tls_port, tls_context(lsn)))  # unusable files: fail before anything
        doorman = self.doorman
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_REQUESTED, handle_requested, [doorman, self.intake]),
            (evt.EVT_ACCEPTED, handle_accepted, [self.intake, self.metrics]),
            (evt.EVT_REJECTED, handle_rejected, [self.intake]),
            (evt.EVT_RELEASED, handle_released),
            (evt.EVT_ABORTED, handle_released),
            (evt.EVT_CONN_CLOSE, handle_conn_close),
        ]
        if lsn.accept_unknown_sop_classes:
            handlers.append((evt.EVT_REQUESTED, accept_unknown, [TRANSFER_SYNTAXES]))
        ae = build_ae(self.settings)
        servers: list[DoorServer] = []
        try:  # every port bound before anything runs: a port taken leaves nothing behind
            for port, ssl_context in ports:
                server = ae.make_server(
                    (lsn.host, port),
                    ssl_context=ssl_context,
                    evt_handlers=handlers,
                    server_class=DoorServer,
                    doorman=doorman,
                    intake=self.intake,
                    request_timeout=lsn.association_request_timeout_seconds,
                    reuse_port=lsn.processes > 1,
                )
                servers.append(cast(DoorServer, server))
        except Exception:
            for server in servers:
                server.server_close()
            raise
        removed = self.spool.use_own_tmp()  # before any C-STORE of ours can be writing there
        self.arrivals.start()
        self.servers = servers
        for server in servers:
            port = server.server_address[1]
            threading.Thread(
                target=server.serve_forever, name=f"DicomListener@{port}", daemon=True
            ).start()
        threading.Thread(target=self._report, name="report", daemon=True).start()
        if removed:
            log.info("listener.partial_writes_removed", files=removed)
        log.info(
            "listener.started",
            ae_title=lsn.ae_title,
            host=lsn.host,
            port=lsn.port,
            tls_port=lsn.tls_port,
            client_certificates=lsn.tls_ca_file is not None,
        )

    def stop(self) -> None:
        self._stopping.set()
        while self.servers:
            self.servers.pop().shutdown()
        self.arrivals.stop()
        self.metrics.flush()
        log.info("listener.stopped")
