"""DIMSE storage statuses sorted into done / retry / dead letter, once for both DICOM sinks.

A C-STORE response Status (PS3.4 B.2.3, PS3.7 C) and a STOW-RS Failure Reason (0008,1197) or
Warning Reason (0008,1196) (PS3.18 10.5.3) share one code space, so one table decides for both:

    0x0000 success; warnings 0xB000 coercion, 0xB006 elements discarded,
      0xB007 data set does not match SOP class, 0x0001/0x0107/0x0116        -> DONE
    0xA700-0xA7FF refused: out of resources; 0x0213 resource limitation     -> TRANSIENT
    any other failure: 0xA900-0xA9FF does not match SOP class, 0xC000-0xCFFF
      cannot understand (0xC122 transfer syntax not supported), 0x0110
      processing failure, 0x0122 SOP class not supported, ...               -> PERMANENT

Only a lack of resources is worth retrying: it is the peer's state, not its judgement of the
object. Every other failure is the peer judging the object (it cannot parse it, does not store
its class or syntax), and the same bytes get the same answer. 0x0110 "processing failure" is
the one ambiguous code; it is dead-lettered with its name, where an operator can replay it,
rather than retried blind.
"""

from __future__ import annotations

from enum import StrEnum

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category


class Outcome(StrEnum):
    """What the caller does with an instance that got this status."""

    DONE = "done"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


#: Failure codes that mean "not now": the peer is out of resources.
RESOURCE_LIMITATION = 0x0213

#: Names PS3.18 gives STOW-RS failure reasons where the C-STORE table has a broader one.
STOW_REASON_NAMES = {
    0x0110: "Processing failure",
    0x0122: "Referenced SOP Class not supported",
    0xC122: "Referenced Transfer Syntax not supported",
}


def outcome(status: int) -> Outcome:
    """DONE, TRANSIENT or PERMANENT for one status, per the table above."""
    category = code_to_category(status)
    if category in ("Success", "Warning"):
        return Outcome.DONE
    if 0xA700 <= status <= 0xA7FF or status == RESOURCE_LIMITATION:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


def describe(status: int) -> str:
    """``0xA700 Refused: Out of Resources``: the code and its name, for a message or a log."""
    name = STOW_REASON_NAMES.get(status)
    if name is None:
        name = STORAGE_SERVICE_CLASS_STATUS.get(status, (code_to_category(status), ""))[1]
    return f"0x{status:04X} {name or code_to_category(status)}".rstrip()
