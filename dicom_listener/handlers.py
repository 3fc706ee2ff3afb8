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
from pipeline.uids import is_valid_uid, loggable, unsafe_reason

log = structlog.get_logger(__name__)

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


def _peer(assoc: Association) -> dict[str, str]:
    """The requestor's AE title and address, as keyword arguments for logs and events."""
    requestor = assoc.requestor
    return {"calling_ae": printable(requestor.ae_title, 16), "address": str(requestor.address)}


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
) -> int:
    """EVT_C_STORE: durable first, then 0x0000; every failure mapped by ``status_for``."""
    request = cast(C_STORE, event.request)
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    sop_class = str(request.AffectedSOPClassUID or "")
    peer = _peer(event.assoc)
    try:
        _check_command(sop_uid, sop_class)
        bound = log.bind(sop_instance_uid=sop_uid, calling_ae=peer["calling_ae"])
        if spool.contains(sop_uid):
            bound.info("store.duplicate")  # idempotent: same UID, already durable, not redone
            return StoreStatus.SUCCESS
        reason = gate.refuse_reason()
        if reason:
            raise OutOfResources(reason)
        _check_data_set(request, event.context.transfer_syntax, sop_uid, sop_class)
        _note_nonconformant(sop_uid, sop_class, peer, intake)
        data = event.encoded_dataset()
        path = spool.write(sop_uid, data)
        if path is None:
            bound.info("store.duplicate")  # the same instance won the race on another association
            return StoreStatus.SUCCESS
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


def handle_accepted(event: Event, intake: IntakeLog) -> None:
    """EVT_ACCEPTED: who connected, and each presentation context we could not accept."""
    peer = _peer(event.assoc)
    log.info("association.accepted", **peer)
    for cx in event.assoc.rejected_contexts:
        reason = CONTEXT_RESULTS.get(int(cx.result or 0), f"result {cx.result}")
        abstract = loggable(str(cx.abstract_syntax))
        log.info("association.context_rejected", abstract_syntax=abstract, reason=reason, **peer)
        intake.record(_event(Kind.CONTEXT_REJECTED, reason, peer, sop_class_uid=abstract))


def rejection_reason(assoc: Association) -> str:
    """Why pynetdicom rejected this association request (it does not say), by its own checks."""
    ae = assoc.ae
    request = _request(assoc)
    if ae.require_called_aet and request.called_ae_title != assoc.acceptor.ae_title.strip():
        return "called AE title not recognised"
    if ae.require_calling_aet and request.calling_ae_title not in ae.require_calling_aet:
        return "calling AE title not allowed"
    return "too many associations, or the request was not acceptable"


def handle_rejected(event: Event, intake: IntakeLog) -> None:
    """EVT_REJECTED: an association refused before it began."""
    peer = _peer(event.assoc)
    reason = rejection_reason(event.assoc)
    called = printable(_request(event.assoc).called_ae_title, 16)
    log.warning("association.rejected", called_ae=called, reason=reason, **peer)
    intake.record(_event(Kind.ASSOCIATION_REJECTED, reason, peer))


def handle_released(event: Event) -> None:
    """EVT_RELEASED / EVT_ABORTED: the end of an association."""
    log.info("association.closed", how=event.event.name, **_peer(event.assoc))


def handle_conn_close(event: Event, intake: IntakeLog) -> None:
    """EVT_CONN_CLOSE: a connection that never delivered a decodable association request (an AE
    title that is not ASCII, garbage, or nothing before the ACSE timeout) was turned away by
    pynetdicom's DUL with an A-ABORT, as PS3.8 prescribes for an invalid PDU: count it."""
    if event.assoc.requestor.primitive is None:
        peer = _peer(event.assoc)
        reason = "no decodable association request"
        log.warning("association.rejected", reason=reason, **peer)
        intake.record(_event(Kind.ASSOCIATION_REJECTED, reason, peer))
