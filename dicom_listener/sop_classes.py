"""Which SOP classes the listener stores.

A forwarding target must take whatever its PACS stored, so the listener negotiates every
standard storage SOP class — pynetdicom's list plus the retired ones it leaves out (retired US
Image Storage ``1.2.840.10008.5.1.4.1.1.6``, old NM and US multi-frame, trial SR...), taken from
pydicom's UID dictionary and registered with pynetdicom's storage service. Unknown and private
classes (a vendor's own) are accepted only when ``listener.accept_unknown_sop_classes`` is on,
like Orthanc's ``UnknownSopClassAccepted``: :func:`accept_unknown` adds them, per association,
to what the acceptor supports. Whether an accepted object is *embedded* is decided later, from
its Modality (``convert.embed_modalities``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from pydicom._uid_dict import UID_dictionary
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts, build_context
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import register_uid, uid_to_service_class

from pipeline.uids import is_safe_uid

#: Storage-sounding dictionary entries that are not storage SOP classes.
_NOT_STORAGE = ("Commitment", "Directory")

_lock = threading.Lock()


def _is_storage_entry(uid: str) -> bool:
    name, kind, *_ = UID_dictionary[uid]
    return kind == "SOP Class" and "Storage" in name and not any(w in name for w in _NOT_STORAGE)


def _register(uid: str, keyword: str) -> None:
    with _lock:
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, keyword, StorageServiceClass)


def storage_sop_classes() -> list[str]:
    """Every standard storage SOP class, retired included, each registered with pynetdicom."""
    known = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    extra = sorted(uid for uid in UID_dictionary if _is_storage_entry(uid) and uid not in known)
    for uid in extra:
        _register(uid, UID_dictionary[uid][4])
    return known + extra


def is_unknown(uid: str) -> bool:
    """Private, or not in the DICOM standard pydicom knows."""
    return uid not in UID_dictionary


def accept_unknown(event: Event, transfer_syntaxes: Sequence[str]) -> None:
    """EVT_REQUESTED: support the unknown/private abstract syntaxes this requestor proposes, as
    storage, with the transfer syntaxes we decode. Runs before negotiation, on this association
    only."""
    assoc = event.assoc
    supported = {str(cx.abstract_syntax) for cx in assoc.acceptor.supported_contexts}
    request = assoc.requestor.primitive
    proposed = request.presentation_context_definition_list if request else []
    extra = []
    for uid in sorted({str(cx.abstract_syntax) for cx in proposed}):
        if uid in supported or not is_safe_uid(uid) or not is_unknown(uid):
            continue
        _register(uid, "UnknownStorage_" + "".join(c if c.isalnum() else "_" for c in uid))
        extra.append(build_context(uid, list(transfer_syntaxes)))
    if extra:
        assoc.acceptor.supported_contexts = [*assoc.acceptor.supported_contexts, *extra]
