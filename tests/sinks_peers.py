"""Test peers for the sinks, all on loopback and all stopped by their ``with`` block: SR data
sets to send, a pynetdicom Storage SCP answering a chosen status (optionally over TLS), a tiny
threaded HTTP receiver that records what it got, and certificates made with ``cryptography``.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from tests.conftest import free_port

if TYPE_CHECKING:
    from tests.orthanc import Orthanc

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

#: The synthetic patient values of make_sr: never in a sink's error message.
PATIENT_VALUES = ("CANARY", "PHI1")


def assert_no_phi(error: Exception) -> None:
    assert not any(value in str(error) for value in PATIENT_VALUES), str(error)


def study_instances(pacs: Orthanc, study_uid: str) -> set[str]:
    """The SOP Instance UIDs Orthanc holds in ``study_uid``, which
    it must hold as exactly one study."""
    studies = pacs.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    assert len(studies) == 1
    return {
        item["MainDicomTags"]["SOPInstanceUID"]
        for item in pacs.get(f"/studies/{studies[0]}/instances")
    }


def make_sr(study_uid: str | None = None) -> Dataset:
    """A minimal valid SR in ``study_uid``: highdicom's Comprehensive SR when it is installed,
    else a Basic Text SR built by hand. Synthetic patient values only."""
    study_uid = study_uid or generate_uid()
    try:
        return _highdicom_sr(study_uid)
    except ImportError:
        return _basic_text_sr(study_uid)


def _evidence(study_uid: str) -> Dataset:
    image = Dataset()
    image.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    image.SOPInstanceUID = generate_uid()
    image.StudyInstanceUID = study_uid
    image.SeriesInstanceUID = generate_uid()
    image.PatientName = "CANARY^PHI"
    image.PatientID = "CANARYPHI1"
    image.PatientBirthDate = ""
    image.PatientSex = "O"
    image.StudyDate = "20240101"
    image.StudyTime = "120000"
    image.StudyID = "1"
    image.AccessionNumber = ""
    image.ReferringPhysicianName = ""
    image.Modality = "OT"
    return image


def _highdicom_sr(study_uid: str) -> Dataset:
    from highdicom.sr import (
        CodedConcept,
        ComprehensiveSR,
        ContainerContentItem,
        ContentSequence,
        RelationshipTypeValues,
        TextContentItem,
    )

    finding = TextContentItem(
        name=CodedConcept("121071", "DCM", "Finding"),
        value="pacs-embed sink test",
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    root = ContainerContentItem(name=CodedConcept("126000", "DCM", "Imaging Measurement Report"))
    root.ContentSequence = ContentSequence([finding])
    sr: Dataset = ComprehensiveSR(
        evidence=[_evidence(study_uid)],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="pacs-embed tests",
        record_evidence=False,
    )
    return sr


def _basic_text_sr(study_uid: str) -> Dataset:
    sr = _evidence(study_uid)
    sr.SOPClassUID = BASIC_TEXT_SR
    sr.SOPInstanceUID = generate_uid()
    sr.SeriesInstanceUID = generate_uid()
    sr.Modality = "SR"
    sr.SeriesNumber = 99
    sr.InstanceNumber = 1
    sr.Manufacturer = "pacs-embed tests"
    sr.ValueType = "CONTAINER"
    sr.ContinuityOfContent = "SEPARATE"
    sr.CompletionFlag = "PARTIAL"
    sr.VerificationFlag = "UNVERIFIED"
    sr.ContentDate, sr.ContentTime = "20240101", "120000"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "126000", "DCM"
    concept.CodeMeaning = "Imaging Measurement Report"
    sr.ConceptNameCodeSequence = [concept]
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return sr


class StoreSCP:
    """A pynetdicom Storage SCP for SR on a free loopback port that answers ``status`` to every
    C-STORE and keeps the data sets it acknowledged; ``ssl_context`` serves DICOM TLS."""

    def __init__(
        self,
        status: int = 0x0000,
        *,
        ae_title: str = "SINK_SCP",
        ssl_context: ssl.SSLContext | None = None,
        sop_classes: tuple[str, ...] = (COMPREHENSIVE_SR, BASIC_TEXT_SR),
        require_called_aet: bool = False,
    ) -> None:
        self.status = status
        self.ae_title = ae_title
        self.port = free_port()
        self.received: list[Dataset] = []
        self.calling: list[str] = []
        self._ssl = ssl_context
        self._ae = AE(ae_title=ae_title)
        self._ae.require_called_aet = require_called_aet
        for sop_class in sop_classes:
            self._ae.add_supported_context(sop_class)
        self._server: ThreadedAssociationServer | None = None

    def _on_store(self, event: Any) -> int:
        self.calling.append(event.assoc.requestor.ae_title)
        if self.status == 0x0000 or 0xB000 <= self.status <= 0xBFFF:
            self.received.append(event.dataset)
        return self.status

    def __enter__(self) -> StoreSCP:
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=self._ssl,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()


@dataclass
class Recorded:
    """One request the HTTP receiver got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HTTPReceiver:
    """``with HTTPReceiver(answer) as server:`` a threaded HTTP server on a free loopback port;
    ``answer(recorded) -> (status, headers, body)`` decides each response."""

    answer: Callable[[Recorded], tuple[int, dict[str, str], bytes]]
    requests: list[Recorded] = field(default_factory=list)
    port: int = 0

    def __enter__(self) -> HTTPReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = _read_chunked(self.rfile)
                else:
                    body = self.rfile.read(length)
                recorded = Recorded("POST", self.path, dict(self.headers.items()), body)
                receiver.requests.append(recorded)
                status, headers, payload = receiver.answer(recorded)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


class _QuietServer(ThreadingHTTPServer):
    """A client that gave up (a timeout test) is expected: no traceback on stderr for it."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def _read_chunked(stream: Any) -> bytes:
    body = b""
    while True:
        size = int(stream.readline().split(b";")[0].strip(), 16)
        if size == 0:
            stream.readline()
            return body
        body += stream.read(size)
        stream.readline()


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost, a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path) -> Certificates:
    """A throw-away CA and two leaf certificates signed by it, valid for one day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("pacs-embed test CA"))
        .issuer_name(name("pacs-embed test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(common: str, usage: x509.ObjectIdentifier, prefix: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path = directory / f"{prefix}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, write_key(key, directory / f"{prefix}.key")

    server_cert, server_key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, "server")
    client_cert, client_key = leaf("pacs-embed", ExtendedKeyUsageOID.CLIENT_AUTH, "client")
    return Certificates(directory / "ca.pem", server_cert, server_key, client_cert, client_key)


def server_ssl_context(certs: Certificates, *, require_client_cert: bool) -> ssl.SSLContext:
    """The SCP's side: its certificate, and with ``require_client_cert`` ours verified."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.ca))
    context.load_cert_chain(certs.server_cert, certs.server_key)
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return context
