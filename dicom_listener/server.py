"""Wiring for the listener host: spool, dispatcher, reconciliation and the pynetdicom SCP, on
``listener.port`` and, with TLS, also on ``listener.tls_port`` (one AE, one set of handlers, the
door of :mod:`.door` on each)."""

from __future__ import annotations

import ssl
import threading
from pathlib import Path
from typing import Any, cast

import redis
import structlog
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from rq import Queue

from dicom_listener.dispatcher import Dispatcher, DispatchLimits
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
from dicom_listener.reconcile import reconcile
from dicom_listener.sop_classes import accept_unknown, storage_sop_classes
from dicom_listener.spool import Spool
from pipeline import health
from pipeline.convert import DECODABLE_TRANSFER_SYNTAXES, ConvertOptions
from pipeline.intake import IntakeLog
from pipeline.jobs import EMBED_QUEUE, EmbedBatch, enqueue_batch
from pipeline.ledger import Ledger
from pipeline.settings import Settings
from pipeline.store import EmbeddingStore
from pipeline.studies import Studies

log = structlog.get_logger(__name__)

#: What we accept: every syntax the conversion decodes (uncompressed, deflated, big endian, JPEG,
#: JPEG-LS, JPEG 2000, RLE), so nothing is accepted that would only be quarantined later.
TRANSFER_SYNTAXES = list(DECODABLE_TRANSFER_SYNTAXES)


def _any_uid(_value: object) -> tuple[bool, str]:
    return True, ""


# pynetdicom refuses a command whose UID is over 64 characters by aborting the association
# without a response, logging the value three times. The C-STORE handler checks UIDs itself and
# answers 0xC000 (and its log never quotes them), so pynetdicom's own check is turned off.
_config.VALIDATORS["UI"] = _any_uid


class Gate:
    """Back-pressure for the C-STORE handler: low disk or a deep backlog -> 0xA700."""

    def __init__(self, spool: Spool, dispatcher: Dispatcher, min_free_bytes: int, max_backlog: int):
        self.spool = spool
        self.dispatcher = dispatcher
        self.min_free_bytes = min_free_bytes
        self.max_backlog = max_backlog

    def refuse_reason(self) -> str | None:
        if self.spool.free_bytes() < self.min_free_bytes:
            return "free disk under the watermark"
        if self.dispatcher.backlog() >= self.max_backlog:
            return "backlog over its bound"
        return None


#: pynetdicom's own limit counts connections, idle ones included, when a request arrives; the
#: Doorman counts associations instead, so pynetdicom's is set out of reach.
_PYNETDICOM_LIMIT_OFF = 2**31 - 1


def build_ae(settings: Settings) -> AE:
    lsn = settings.listener
    ae = AE(ae_title=lsn.ae_title)
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


class Listener:
    """The listener host's processes-in-one: start() reconciles, then accepts associations."""

    def __init__(self, settings: Settings, connection: redis.Redis) -> None:
        self.settings = settings
        self.connection = connection
        self.spool = Spool(settings.spool_dir, settings.quarantine_dir)
        self.ledger = Ledger(connection)
        self.intake = IntakeLog(connection)
        self.queue = Queue(EMBED_QUEUE, connection=connection)
        self.dispatcher = Dispatcher(
            spool=self.spool,
            ledger=self.ledger,
            enqueue=self._enqueue,
            queue_depth=lambda: self.queue.count,
            options=ConvertOptions.from_settings(settings),
            limits=DispatchLimits.from_settings(settings),
            processes=settings.convert.processes,
            log_settings=(settings.log.level, settings.log.format),
            report=lambda report: health.publish(connection, health.DISPATCHER, report),
            arrived=Studies(connection, settings.study).arrived,
            forget=EmbeddingStore(connection, self.ledger).forget,
        )
        self.gate = Gate(
            self.spool,
            self.dispatcher,
            settings.listener.min_free_disk_mb * 1024 * 1024,
            settings.listener.max_backlog,
        )
        self.servers: list[DoorServer] = []

    def _enqueue(self, batch: EmbedBatch) -> str:
        qs = self.settings.queue
        return enqueue_batch(
            self.queue, batch, timeout=qs.job_timeout_seconds, retries=qs.max_retries
        )

    def _submit(self, path: Path) -> None:
        self.dispatcher.submit(path)

    def start(self) -> None:
        lsn = self.settings.listener
        ports: list[tuple[int, ssl.SSLContext | None]] = [(lsn.port, None)]
        if lsn.tls_port is not None:
            ports.append((lsn.tls_port, tls_context(lsn)))  # unusable files: fail before anything
        reconcile(self.spool, self.ledger, self.connection, self._submit)
        self.dispatcher.start()
        doorman = Doorman(lsn)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, handle_store, [self.spool, self.gate, self._submit, self.intake]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_REQUESTED, handle_requested, [doorman, self.intake]),
            (evt.EVT_ACCEPTED, handle_accepted, [self.intake]),
            (evt.EVT_REJECTED, handle_rejected, [self.intake]),
            (evt.EVT_RELEASED, handle_released),
            (evt.EVT_ABORTED, handle_released),
            (evt.EVT_CONN_CLOSE, handle_conn_close),
        ]
        if lsn.accept_unknown_sop_classes:
            handlers.append((evt.EVT_REQUESTED, accept_unknown, [TRANSFER_SYNTAXES]))
        ae = build_ae(self.settings)
        for port, ssl_context in ports:
            server = ae.make_server(
                (lsn.host, port),
                ssl_context=ssl_context,
                evt_handlers=handlers,
                server_class=DoorServer,
                doorman=doorman,
                intake=self.intake,
                request_timeout=lsn.association_request_timeout_seconds,
            )
            self.servers.append(cast(DoorServer, server))
            threading.Thread(
                target=server.serve_forever, name=f"DicomListener@{port}", daemon=True
            ).start()
        log.info(
            "listener.started",
            ae_title=lsn.ae_title,
            host=lsn.host,
            port=lsn.port,
            tls_port=lsn.tls_port,
            client_certificates=lsn.tls_ca_file is not None,
        )

    def stop(self) -> None:
        while self.servers:
            self.servers.pop().shutdown()
        self.dispatcher.stop()
        log.info("listener.stopped")
