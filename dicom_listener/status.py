"""C-STORE statuses (PS3.4 Table B.2-1) and the one place exceptions become them.

pynetdicom's ``Status`` names only SUCCESS, so the storage codes are named here; a test checks
each against pynetdicom's own table of storage statuses. No warning statuses: some senders treat
any non-zero status as a failure and resend forever.
"""

from __future__ import annotations

from enum import IntEnum

from pynetdicom.status import Status

from pipeline.errors import SpoolError


class StoreStatus(IntEnum):
    SUCCESS = Status.SUCCESS
    #: Refused: Out of Resources. Senders retry later: our back-pressure signal.
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: Cannot understand (missing/invalid UIDs, unparseable data set).
    CANNOT_UNDERSTAND = 0xC000


class Refused(Exception):
    """Raised inside the handler to answer with ``status``; ``reason`` is logged (no PHI)."""

    status = StoreStatus.CANNOT_UNDERSTAND

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CannotUnderstand(Refused):
    status = StoreStatus.CANNOT_UNDERSTAND


class DoesNotMatchSOPClass(Refused):
    status = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS


class OutOfResources(Refused):
    status = StoreStatus.OUT_OF_RESOURCES


def status_for(exc: BaseException) -> tuple[StoreStatus, str]:
    """Map an exception from the C-STORE path to the status the sender gets, and its reason."""
    if isinstance(exc, Refused):
        return exc.status, exc.reason
    if isinstance(exc, SpoolError):
        return StoreStatus.OUT_OF_RESOURCES, str(exc)
    if isinstance(exc, OSError | MemoryError):
        return StoreStatus.OUT_OF_RESOURCES, f"out of resources: {type(exc).__name__}"
    # Anything unexpected: we could not process it; the sender may retry. Never a crash.
    return StoreStatus.OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}"
