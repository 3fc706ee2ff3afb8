"""The DICOM sink: C-STORE of our SR/KOS objects to a DICOM node, pynetdicom as the SCU.

One association per ``send`` (a result is a handful of objects; a pooled association would
have to be checked for liveness before every use, and the node may drop idle ones). It requests
one presentation context per SOP class sent, each with the object's own transfer syntax plus
Explicit and Implicit VR Little Endian (pynetdicom converts between the two uncompressed ones).
Instances are sent in order; the first that fails ends the call.

    could not connect (refused, unreachable, timed out, TLS handshake)  TransientPushError
    association rejected (either result) or aborted, no C-STORE answer   TransientPushError
    none of our presentation contexts accepted, or not this object's     PermanentPushError
    a status 0xA7xx / 0x0213 (out of resources)                          TransientPushError
    0xA9xx, 0xCxxx, 0x0110, 0x0122, any other failure                    PermanentPushError
    0x0000 and warnings (0xB000, 0xB006, 0xB007)                         done

A rejection, even "rejected-permanent" (e.g. our calling AE title is unknown there), is
retried: the node's or our configuration is at fault, not the object, and an operator can fix
it while the back-off runs (as an endpoint's 401 is retried). A node that accepts the
association but none of its contexts has said it does not store this SOP class, which is about
the object: like status 0x0122, it is dead-lettered. Messages hold UIDs, statuses and counts.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

from pipeline.errors import ConfigError, PermanentPushError, TransientPushError
from pipeline.sections import DicomSinkSettings
from pipeline.sinks.statuses import Outcome, describe, outcome

#: The SOP classes pacs-embed sends back (for reference and the peers' configuration): Basic
#: Text, Enhanced, Comprehensive and Comprehensive 3D SR, and Key Object Selection.
SR_KOS_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.11",
    "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.88.59",
)

#: Presentation contexts one association may request (PS3.8: odd IDs 1-255).
MAX_CONTEXTS = 128


def client_ssl_context(settings: DicomSinkSettings) -> ssl.SSLContext:
    """A TLS client context that verifies the node (CA file, else the system CAs, and its host
    name) and presents our certificate when one is configured."""
    try:
        context = ssl.create_default_context(
            cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None
        )
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"sinks.dicom: cannot load the TLS files: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class DicomSink:
    """C-STORE to the node of ``[sinks.dicom]``. Thread-safe: each call has its own AE."""

    def __init__(self, settings: DicomSinkSettings) -> None:
        if settings.host is None or settings.ae_title is None:
            raise ConfigError("sinks.dicom.host is not set: the DICOM sink is off")
        self._settings = settings
        self._host = settings.host
        self._called = settings.ae_title
        self._ssl = client_ssl_context(settings) if settings.tls else None

    def send(self, datasets: Sequence[Dataset]) -> dict[str, int]:
        """Store every data set over one association; return each SOP Instance UID's status
        (0x0000 or a warning). Raises TransientPushError / PermanentPushError (see module)."""
        syntaxes = _contexts(datasets)
        if not syntaxes:
            return {}
        ae = AE(ae_title=self._settings.calling_ae_title)
        timeout = self._settings.timeout_seconds
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        for sop_class, transfer_syntaxes in syntaxes.items():
            ae.add_requested_context(sop_class, transfer_syntaxes)
        seen = _Negotiation()
        assoc = ae.associate(
            self._host,
            self._settings.port,
            ae_title=self._called,
            tls_args=(self._ssl, self._host) if self._ssl is not None else None,
            evt_handlers=[(evt.EVT_CONN_OPEN, seen.opened), (evt.EVT_ACSE_RECV, seen.received)],
        )
        if not assoc.is_established:
            raise self._not_established(assoc, seen, len(syntaxes))
        try:
            statuses = self._store_all(assoc, datasets)
        except BaseException:
            assoc.abort()
            raise
        assoc.release()
        return statuses

    def _store_all(self, assoc: Association, datasets: Sequence[Dataset]) -> dict[str, int]:
        statuses: dict[str, int] = {}
        for index, dataset in enumerate(datasets):
            uid = str(dataset.SOPInstanceUID)
            try:
                answer = assoc.send_c_store(dataset)
            except ValueError as exc:  # no accepted context for this class/syntax, or unencodable
                raise PermanentPushError(
                    f"C-STORE of {uid} (SOP class {dataset.SOPClassUID}) impossible: the node "
                    f"accepted no presentation context for it, or it cannot be encoded "
                    f"({type(exc).__name__}); {index} of {len(datasets)} stored"
                ) from exc
            if "Status" not in answer:
                raise TransientPushError(
                    f"no answer to the C-STORE of {uid} (association aborted or "
                    f"{self._settings.timeout_seconds:g} s timeout); {index} of {len(datasets)} "
                    "stored"
                )
            status = int(answer.Status)
            verdict = outcome(status)
            if verdict is Outcome.DONE:
                statuses[uid] = status
                continue
            error = TransientPushError if verdict is Outcome.TRANSIENT else PermanentPushError
            raise error(
                f"C-STORE of {uid} answered {describe(status)}; {index} of {len(datasets)} stored",
                status=status,
                failures={uid: status},
            )
        return statuses

    def _not_established(
        self, assoc: Association, seen: _Negotiation, contexts: int
    ) -> TransientPushError | PermanentPushError:
        where = f"{self._called}@{self._host}:{self._settings.port}"
        answer = seen.answer
        if answer is not None and answer.result == 0x00:
            return PermanentPushError(
                f"{where} accepted none of the {contexts} presentation contexts requested "
                "(it does not store these SOP classes in these transfer syntaxes)"
            )
        if assoc.is_rejected and answer is not None:
            return TransientPushError(
                f"association rejected by {where}: {answer.result_str}, source "
                f"{answer.source_str}, reason {answer.reason_str}"
            )
        if not seen.connected:
            tls = " (TLS)" if self._ssl is not None else ""
            return TransientPushError(
                f"no connection to {where}{tls}: refused, unreachable, timed out or the TLS "
                "handshake failed"
            )
        return TransientPushError(f"association with {where} aborted or timed out")


class _Negotiation:
    """What the association attempt saw, from pynetdicom's events: whether the TCP (and TLS)
    connection opened, and the peer's A-ASSOCIATE answer (result, source, reason)."""

    def __init__(self) -> None:
        self.connected = False
        self.answer: A_ASSOCIATE | None = None

    def opened(self, event: Any) -> None:
        self.connected = True

    def received(self, event: Any) -> None:
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_ASSOCIATE) and primitive.result is not None:
            self.answer = primitive


def _contexts(datasets: Sequence[Dataset]) -> dict[str, list[str]]:
    """SOP class -> transfer syntaxes to request, checking first what C-STORE will need."""
    contexts: dict[str, list[str]] = {}
    for index, dataset in enumerate(datasets):
        if "SOPClassUID" not in dataset or "SOPInstanceUID" not in dataset:
            raise PermanentPushError(f"data set {index} has no SOP Class or SOP Instance UID")
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is None:
            raise PermanentPushError(
                f"data set {dataset.SOPInstanceUID} has no Transfer Syntax UID in its File Meta"
            )
        wanted = contexts.setdefault(str(dataset.SOPClassUID), [])
        for uid in (str(syntax), ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if uid not in wanted:
                wanted.append(uid)
    if len(contexts) > MAX_CONTEXTS:
        raise PermanentPushError(f"{len(contexts)} SOP classes in one call; at most {MAX_CONTEXTS}")
    return contexts
