"""The DICOM sink against real peers: Orthanc (stored in the right study), pynetdicom SCPs that
answer chosen statuses, refuse or stall, and a DICOM TLS SCP with certificates made here."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ConfigError, PermanentPushError, PushError, TransientPushError
from pipeline.sections import DicomSinkSettings
from pipeline.sinks.dicom import DicomSink
from tests.conftest import free_port
from tests.orthanc import Orthanc, available
from tests.sinks_peers import (
    BASIC_TEXT_SR,
    StoreSCP,
    assert_no_phi,
    make_certificates,
    make_sr,
    server_ssl_context,
    study_instances,
)


def _sink(port: int, ae_title: str = "SINK_SCP", **settings: Any) -> DicomSink:
    return DicomSink(
        DicomSinkSettings(
            host="127.0.0.1", port=port, ae_title=ae_title, timeout_seconds=5, **settings
        )
    )


#: pynetdicom 3.0 leaks the socket of a failed connect (``_shutdown_socket`` skips ``close()``
#: when ``shutdown()`` raises ENOTCONN); CPython closes it at once, with a ResourceWarning.
leaked_socket = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.skipif(not available(), reason="Orthanc not installed (make test installs it)")
def test_stores_srs_in_orthanc_in_their_study(tmp_path: Path) -> None:
    """Two SRs sent over one association land in Orthanc, in the study they name."""
    with Orthanc(tmp_path / "orthanc", {"pe": ("PACS_EMBED", free_port())}) as pacs:
        first = make_sr()
        second = make_sr(str(first.StudyInstanceUID))
        sink = _sink(pacs.dicom_port, ae_title="ORTHANC")
        statuses = sink.send([first, second])
        assert statuses == {str(first.SOPInstanceUID): 0, str(second.SOPInstanceUID): 0}
        assert study_instances(pacs, str(first.StudyInstanceUID)) == {
            str(first.SOPInstanceUID),
            str(second.SOPInstanceUID),
        }


@pytest.mark.skipif(not available(), reason="Orthanc not installed (make test installs it)")
def test_unknown_calling_ae_is_a_transient_rejection(tmp_path: Path) -> None:
    """Orthanc rejects a calling AE it does not know: retried (configuration, not the data)."""
    with Orthanc(tmp_path / "orthanc", {"other": ("OTHER", free_port())}) as pacs:
        with pytest.raises(TransientPushError, match="rejected") as caught:
            _sink(pacs.dicom_port, ae_title="ORTHANC").send([make_sr()])
        assert_no_phi(caught.value)
        assert pacs.instances() == []


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (0xA700, TransientPushError),
        (0xA7FE, TransientPushError),
        (0x0213, TransientPushError),
        (0xA900, PermanentPushError),
        (0xC000, PermanentPushError),
        (0x0110, PermanentPushError),
        (0x0122, PermanentPushError),
    ],
)
def test_failure_statuses_are_classified(status: int, error: type[PushError]) -> None:
    """Out of resources is retried; every other failure status is dead-lettered, named."""
    sr = make_sr()
    with StoreSCP(status) as scp, pytest.raises(error) as caught:
        _sink(scp.port).send([sr, make_sr()])
    assert type(caught.value) is error
    assert caught.value.status == status
    assert caught.value.failures == {str(sr.SOPInstanceUID): status}
    assert f"0x{status:04X}" in str(caught.value)
    assert "0 of 2 stored" in str(caught.value)  # the first failure ends the call
    assert_no_phi(caught.value)


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB007])
def test_success_and_warnings_are_done(status: int) -> None:
    """0x0000 and the warning statuses mean stored; the status is returned per instance."""
    sr = make_sr()
    with StoreSCP(status) as scp:
        assert _sink(scp.port).send([sr]) == {str(sr.SOPInstanceUID): status}
        assert scp.calling == ["PACS_EMBED"]
        assert [str(ds.SOPInstanceUID) for ds in scp.received] == [str(sr.SOPInstanceUID)]


@leaked_socket
def test_closed_port_is_transient() -> None:
    """Nothing listening: a transient error, at once."""
    with pytest.raises(TransientPushError, match="no connection") as caught:
        _sink(free_port()).send([make_sr()])
    assert_no_phi(caught.value)


def test_silent_peer_times_out_transiently() -> None:
    """A peer that accepts TCP but never answers the association: transient after the timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sink = DicomSink(
            DicomSinkSettings(
                host="127.0.0.1", port=listener.getsockname()[1], ae_title="X", timeout_seconds=1
            )
        )
        with pytest.raises(TransientPushError):
            sink.send([make_sr()])


def test_wrong_called_ae_is_transient() -> None:
    """An SCP that checks the called AE title rejects ours: retried, the reason in the message."""
    with StoreSCP(require_called_aet=True) as scp:
        with pytest.raises(TransientPushError, match=r"Rejected Permanent.*Called AE title"):
            _sink(scp.port, ae_title="NOT_IT").send([make_sr()])
        assert scp.received == []


def test_sop_class_not_accepted_is_permanent() -> None:
    """A node that accepts none of our contexts does not store this SOP class: dead letter."""
    sr = make_sr()
    others = tuple(c for c in (BASIC_TEXT_SR, "1.2.840.10008.5.1.4.1.1.7") if c != sr.SOPClassUID)
    with StoreSCP(sop_classes=others) as scp, pytest.raises(PermanentPushError) as caught:
        _sink(scp.port).send([sr])
    assert "presentation contexts" in str(caught.value)


def test_data_set_without_transfer_syntax_is_permanent() -> None:
    """A data set C-STORE cannot encode is refused before any connection."""
    sr = make_sr()
    del sr.file_meta.TransferSyntaxUID
    with pytest.raises(PermanentPushError, match="Transfer Syntax"):
        _sink(free_port()).send([sr])


def test_tls_with_client_certificate_stores(tmp_path: Path) -> None:
    """DICOM TLS: the SCP's certificate verified against our CA, ours presented and required."""
    certs = make_certificates(tmp_path / "certs")
    sr = make_sr()
    with StoreSCP(ssl_context=server_ssl_context(certs, require_client_cert=True)) as scp:
        sink = _sink(
            scp.port,
            tls=True,
            tls_ca_file=certs.ca,
            tls_cert_file=certs.client_cert,
            tls_key_file=certs.client_key,
        )
        assert sink.send([sr]) == {str(sr.SOPInstanceUID): 0}
        assert [str(ds.SOPInstanceUID) for ds in scp.received] == [str(sr.SOPInstanceUID)]


@leaked_socket
def test_tls_with_untrusted_server_is_transient(tmp_path: Path) -> None:
    """A server certificate our CA did not sign fails the handshake: transient, nothing sent."""
    certs = make_certificates(tmp_path / "certs")
    stranger = make_certificates(tmp_path / "stranger")
    with StoreSCP(ssl_context=server_ssl_context(certs, require_client_cert=False)) as scp:
        sink = _sink(scp.port, tls=True, tls_ca_file=stranger.ca)
        with pytest.raises(TransientPushError, match="TLS"):
            sink.send([make_sr()])
        assert scp.received == []


def test_settings_refuse_what_cannot_work(tmp_path: Path) -> None:
    """No host: the sink is off; a host without the node's AE title, or half a client
    certificate, is refused by the settings; unreadable TLS files at construction."""
    with pytest.raises(ConfigError, match="off"):
        DicomSink(DicomSinkSettings())
    with pytest.raises(ConfigError, match="ae_title"):
        DicomSinkSettings(host="127.0.0.1")
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file"):
        DicomSinkSettings(host="h", ae_title="A", tls_cert_file=tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="TLS files"):
        DicomSink(DicomSinkSettings(host="h", ae_title="A", tls=True, tls_ca_file=tmp_path / "x"))


def test_empty_send_does_not_connect() -> None:
    """Nothing to send: no association at all."""
    assert _sink(free_port()).send([]) == {}
