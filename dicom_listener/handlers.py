"""One function per DIMSE event. Dependencies arrive through pynetdicom's handler arguments.

The C-STORE handler's only job is to make the instance durable and answer: it checks the two
UIDs it needs (from the command, and the data set's own copy of them, parsed from group 0008
only), applies back-pressure, writes the encoded bytes to the spool and hands the path on.
Pixel data is never decoded here: conversion happens in a process pool, off this thread.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

import structlog
from pydicom import dcmread
from pydicom.tag import Tag
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dicom_listener.spool import Spool
from dicom_listener.status import (
    CannotUnderstand,
    DoesNotMatchSOPClass,
    OutOfResources,
    StoreStatus,
    status_for,
)
from pipeline.uids import is_valid_uid

log = structlog.get_logger(__name__)

_UID_TAGS = [Tag(0x0008, 0x0016), Tag(0x0008, 0x0018)]  # SOP Class UID, SOP Instance UID


class Admission(Protocol):
    """Back-pressure: returns a reason to refuse new instances, or None to accept."""

    def refuse_reason(self) -> str | None: ...


def handle_store(
    event: Event, spool: Spool, admission: Admission, submit: Callable[[Path], None]
) -> int:
    """EVT_C_STORE: durable first, then 0x0000; every failure mapped by ``status_for``."""
    request = cast(C_STORE, event.request)
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    sop_class = str(request.AffectedSOPClassUID or "")
    bound = log.bind(sop_instance_uid=sop_uid, calling_ae=event.assoc.requestor.ae_title)
    try:
        if not is_valid_uid(sop_uid) or not is_valid_uid(sop_class):
            raise CannotUnderstand("missing or invalid Affected SOP Instance/Class UID")
        if spool.contains(sop_uid):
            bound.info("store.duplicate")  # idempotent: same UID, already durable, not redone
            return StoreStatus.SUCCESS
        reason = admission.refuse_reason()
        if reason:
            raise OutOfResources(reason)
        data = event.encoded_dataset()
        check_uids(data, sop_uid, sop_class)
        path = spool.write(sop_uid, data)
        submit(path)
    except Exception as exc:
        status = status_for(exc)
        bound.warning("store.refused", status=f"0x{status:04X}", reason=str(exc))
        return status
    bound.debug("store.accepted", bytes=len(data))
    return StoreStatus.SUCCESS


def check_uids(data: bytes, sop_uid: str, sop_class: str) -> None:
    """The data set must be parseable and carry the UIDs the command announced."""
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=_UID_TAGS)
        found_class = ds.get("SOPClassUID")
        found_uid = ds.get("SOPInstanceUID")
    except Exception as exc:  # any parse failure: we cannot understand it
        raise CannotUnderstand(f"data set cannot be parsed: {type(exc).__name__}") from exc
    if found_uid != sop_uid:
        raise CannotUnderstand("data set SOP Instance UID differs from the command's")
    if found_class != sop_class:
        raise DoesNotMatchSOPClass("data set SOP Class UID differs from the command's")


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: alive."""
    log.debug("echo", calling_ae=event.assoc.requestor.ae_title)
    return StoreStatus.SUCCESS


def handle_accepted(event: Event) -> None:
    """EVT_ACCEPTED: who connected (AE titles and address; no patient data exists yet)."""
    requestor = event.assoc.requestor
    log.info("association.accepted", calling_ae=requestor.ae_title, address=requestor.address)


def handle_released(event: Event) -> None:
    """EVT_RELEASED / EVT_ABORTED: the end of an association."""
    log.info("association.closed", calling_ae=event.assoc.requestor.ae_title, how=event.event.name)
