"""One function per DIMSE or association event. Dependencies arrive through pynetdicom's handler
arguments.

The C-STORE handler's only job is to make the instance durable and answer. It refuses only what
is unsafe or unreadable: a command UID that could not be handled safely, a data set whose start
cannot be parsed, or one whose own SOP UIDs contradict the command. Everything else — including
UIDs that break the UI grammar but are safe, which real archives hold — is acknowledged, and
whatever later turns out unprocessable is quarantined with its reason. Pixel data is never
decoded here, and the data set is read only as far as its SOP Instance UID (:mod:`.peek`).

Every refusal and rejection is logged and recorded in the intake log, so ``/status`` shows why
a sender's "sent" did not arrive. Nothing here logs a value from the data set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

import structlog
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.status import Status

from dicom_listener.peek import Unreadable, peek_sop_uids
from dicom_listener.spool import Spool
from dicom_listener.status import (
    CannotUnderstand,
    DoesNotMatchSOPClass,
    OutOfResources,
    StoreStatus,
    status_for,
)
from pipeline.intake import Event as IntakeEvent
from pipeline.intake import IntakeLog, Kind, printable
from pipeline.phi import carries_phi, phi_values
from pipeline.stage_metrics import ListenerMetrics
from pipeline.uids import is_valid_uid, loggable, unsafe_reason

log = structlog.get_logger(__name__)

#: A-ASSOCIATE-RJ (source, reason/diag.) as the reasons /status shows (PS3.8 9.3.4).
REJECT_REASONS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not allowed",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x01): "no reason given",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded",
}

#: A-ASSOCIATE-RJ when every association slot is held: rejected-transient (senders retry),
#: DICOM UL service-provider (presentation related), local-limit-exceeded.
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)

#: A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2) other than acceptance.
CONTEXT_RESULTS = {
    0x01: "user rejection",
    0x02: "no reason given",
    0x03: "abstract syntax not supported",
    0x04: "transfer syntaxes not supported",
}


class BackPressure(Protocol):
    """Returns a reason to refuse new instances (0xA700), or None to accept."""

    def refuse_reason(self) -> str | None: ...


class Slots(Protocol):
    """Association slots, held from an accepted request to the end of the association
    (:class:`dicom_listener.door.Doorman`)."""

    max_associations: int

    def claim(self, assoc: Association) -> tuple[bool, int]: ...


def _peer(assoc: Association) -> dict[str, str]:
    """The requestor's AE title (from its request, once there is one) and address, as keyword
    arguments for logs and events."""
    requestor = assoc.requestor
    request = requestor.primitive
    calling = request.calling_ae_title if request is not None else requestor.ae_title
    return {"calling_ae": printable(calling, 16), "address": str(requestor.address)}


def _event(
    kind: Kind, reason: str, peer: dict[str, str], sop_class_uid: str = "", status: str = ""
) -> IntakeEvent:
    return IntakeEvent(
        kind,
        reason,
        calling_ae=peer["calling_ae"],
        address=peer["address"],
        sop_class_uid=sop_class_uid,
        status=status,
    )


def _request(assoc: Association) -> A_ASSOCIATE:
    primitive = assoc.requestor.primitive
    assert primitive is not None  # an acceptor's events come after the request arrived
    return primitive


def handle_store(
    event: Event,
    spool: Spool,
    gate: BackPressure,
    submit: Callable[[Path], None],
    intake: IntakeLog,
    timed: Callable[[float], None] = lambda _seconds: None,
) -> int:
    """EVT_C_STORE: durable first, then 0x0000; every failure mapped by ``status_for``.
    ``timed`` is told how long each durable write took (the disk's share of an answer)."""
    request = cast(C_STORE, event.request)
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    sop_class = str(request.AffectedSOPClassUID or "")
    peer = _peer(event.assoc)
    try:
        _check_command(sop_uid, sop_class)
        bound = log.bind(sop_instance_uid=sop_uid, calling_ae=peer["calling_ae"])
        existing = spool.contains(sop_uid)
        data = event.encoded_dataset() if existing else b""
        if existing and spool.holds(sop_uid, data):
            bound.info("store.duplicate")  # idempotent: the same bytes, already durable
            return StoreStatus.SUCCESS
        reason = gate.refuse_reason()
        if reason:
            raise OutOfResources(reason)
        _check_data_set(request, event.context.transfer_syntax, sop_uid, sop_class)
        _note_nonconformant(sop_uid, sop_class, peer, intake)
        data = data or event.encoded_dataset()
        # Different bytes under a spooled UID: a correction replaces the first copy (and opens a
        # new version of its study, docs/architecture.md §11).
        started = time.perf_counter()
        path = spool.write(sop_uid, data, replace=existing)
        timed(time.perf_counter() - started)
        if path is None:
            bound.info("store.duplicate")  # the same instance won the race on another association
            return StoreStatus.SUCCESS
        if existing:
            bound.info("store.correction")
        if spool.release(sop_uid):
            bound.info("store.supersedes_quarantined")
        submit(path)
    except Exception as exc:
        status, reason = status_for(exc)
        log.warning(
            "store.refused",
            sop_instance_uid=loggable(sop_uid),
            status=f"0x{status:04X}",
            reason=reason,
            **peer,
        )
        intake.record(
            _event(
                Kind.REFUSED,
                reason,
                peer,
                sop_class_uid=loggable(sop_class),
                status=f"0x{status:04X}",
            )
        )
        return status
    bound.debug("store.accepted", bytes=len(data))
    return StoreStatus.SUCCESS


def _check_command(sop_uid: str, sop_class: str) -> None:
    for name, uid in (("SOP Instance UID", sop_uid), ("SOP Class UID", sop_class)):
        why = unsafe_reason(uid)
        if why:
            raise CannotUnderstand(f"Affected {name} is {why}")


def _check_data_set(request: C_STORE, transfer_syntax: str, sop_uid: str, sop_class: str) -> None:
    """The data set must be parseable and carry the UIDs the command announced."""
    odd = not is_valid_uid(sop_uid)
    try:
        found = peek_sop_uids(request.DataSet.getbuffer(), transfer_syntax, patient=odd)  # type: ignore[union-attr]
    except Unreadable as exc:
        raise CannotUnderstand(str(exc)) from exc
    if found.sop_instance_uid != sop_uid:
        raise CannotUnderstand("data set SOP Instance UID differs from the command's")
    if found.sop_class_uid != sop_class:
        raise DoesNotMatchSOPClass("data set SOP Class UID differs from the command's")
    if odd and carries_phi(sop_uid, phi_values(found.patient)):
        # It would name the spool file and Redis keys, and be logged: patient data, unsafe.
        raise CannotUnderstand("Affected SOP Instance UID holds patient data")


def _note_nonconformant(
    sop_uid: str, sop_class: str, peer: dict[str, str], intake: IntakeLog
) -> None:
    for name, uid in (("SOP Instance UID", sop_uid), ("SOP Class UID", sop_class)):
        if not is_valid_uid(uid):
            log.info("uid.nonconformant", element=name, sop_instance_uid=sop_uid, **peer)
            intake.record(_event(Kind.NONCONFORMANT_UID, name, peer))


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: alive."""
    log.debug("echo", calling_ae=printable(event.assoc.requestor.ae_title, 16))
    return int(Status.SUCCESS)


def handle_accepted(
    event: Event, intake: IntakeLog, metrics: ListenerMetrics | None = None
) -> None:
    """EVT_ACCEPTED: who connected, and each presentation context we could not accept; counted
    in ``metrics`` (in memory: the listener flushes it)."""
    peer = _peer(event.assoc)
    log.info("association.accepted", **peer)
    if metrics is not None:
        metrics.accepted()
    for cx in event.assoc.rejected_contexts:
        reason = CONTEXT_RESULTS.get(int(cx.result or 0), f"result {cx.result}")
        abstract = loggable(str(cx.abstract_syntax))
        log.info("association.context_rejected", abstract_syntax=abstract, reason=reason, **peer)
        intake.record(_event(Kind.CONTEXT_REJECTED, reason, peer, sop_class_uid=abstract))


def refused_by_title(assoc: Association) -> bool:
    """Whether pynetdicom's negotiation will reject this request for its AE titles (its checks,
    acse.py): such a request never holds an association slot."""
    ae = assoc.ae
    request = _request(assoc)
    calling_allowed = [title.strip() for title in ae.require_calling_aet]
    if calling_allowed and request.calling_ae_title not in calling_allowed:
        return True
    return bool(ae.require_called_aet) and (
        request.called_ae_title != assoc.acceptor.ae_title.strip()
    )


def handle_requested(event: Event, slots: Slots, intake: IntakeLog) -> None:
    """EVT_REQUESTED: the A-ASSOCIATE-RQ arrived. From now on the socket waits as long as an
    association's reads may (pynetdicom's network timeout) instead of the short pre-request bound;
    the association takes a slot, or is rejected "local limit exceeded" when all are held.
    Only requests that get this far hold slots, so idle connections never shut senders out."""
    assoc = event.assoc
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.settimeout(assoc.network_timeout)
    if refused_by_title(assoc):
        return  # pynetdicom rejects it next, with its reason (handle_rejected)
    taken, held = slots.claim(assoc)
    if taken:
        return
    assoc.acse.send_reject(*LOCAL_LIMIT_EXCEEDED)
    peer = _peer(assoc)
    reason = REJECT_REASONS[LOCAL_LIMIT_EXCEEDED[1:]]
    log.warning(
        "association.rejected",
        reason=reason,
        associations=held,
        limit=slots.max_associations,
        **peer,
    )
    intake.record(_event(Kind.ASSOCIATION_REJECTED, reason, peer))
    assoc.kill()  # as pynetdicom does after its own rejections: the A-ASSOCIATE-RJ goes out first


def rejection_reason(assoc: Association) -> str:
    """Why pynetdicom rejected this association request: the A-ASSOCIATE-RJ it sent says."""
    answer = assoc.acceptor.primitive
    if answer is None:
        return "no reason given"
    key = (answer.result_source, answer.diagnostic)
    return REJECT_REASONS.get(key, f"source {key[0]}, reason {key[1]}")  # type: ignore[arg-type]


def handle_rejected(event: Event, intake: IntakeLog) -> None:
    """EVT_REJECTED: an association refused before it began; logged with the calling AE title,
    the called one and the peer's address."""
    peer = _peer(event.assoc)
    reason = rejection_reason(event.assoc)
    called = printable(_request(event.assoc).called_ae_title, 16)
    log.warning("association.rejected", called_ae=called, reason=reason, **peer)
    intake.record(_event(Kind.ASSOCIATION_REJECTED, reason, peer))


def handle_released(event: Event) -> None:
    """EVT_RELEASED / EVT_ABORTED: the end of an association."""
    log.info("association.closed", how=event.event.name, **_peer(event.assoc))


def handle_conn_close(event: Event) -> None:
    """EVT_CONN_CLOSE: a connection closed before its association request (the peer hung up, or
    pynetdicom's DUL closed it after answering an invalid PDU with an A-ABORT, as PS3.8
    prescribes) ends its wait for a request now, not at the timeout; the door then records it."""
    assoc = event.assoc
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        end_request_wait(assoc)


def end_request_wait(assoc: Association) -> None:
    """Wake an acceptor still waiting for its A-ASSOCIATE-RQ with what the wait returns on its
    timeout (None). Not when a request is queued: the DUL queues it before the close event."""
    queue = assoc.dul.to_user_queue
    if queue.empty():
        queue.put(None)  # type: ignore[arg-type]


def refuse_connection(intake: IntakeLog, reason: str, address: str, **counts: int) -> None:
    """A connection closed before any association request was accepted or rejected: over its
    peer's connection limit, a failed TLS handshake, or no decodable request in time (an AE
    title that is not ASCII, garbage, nothing, or a hang-up). Logged with its counts, and
    counted."""
    log.warning("connection.refused", reason=reason, address=address, **counts)
    intake.record(IntakeEvent(Kind.ASSOCIATION_REJECTED, reason, address=printable(address)))
