"""The DICOMweb sink: STOW-RS into Orthanc's DICOMweb plugin, then a fake STOW server on
loopback for each HTTP status and PS3.18 failure list the classification distinguishes."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr
from pydicom import Dataset

from pipeline.errors import ConfigError, PermanentPushError, PushError, TransientPushError
from pipeline.sections import DicomWebSinkSettings
from pipeline.sinks.dicomweb import DicomWebSink
from tests.conftest import free_port
from tests.orthanc import DICOMWEB_PLUGIN, Orthanc, dicomweb_available
from tests.sinks_peers import HTTPReceiver, Recorded, assert_no_phi, make_sr, study_instances

DICOM_JSON = {"Content-Type": "application/dicom+json"}


Answer = Callable[[Recorded], tuple[int, dict[str, str], bytes]]


def _answer(
    status: int, headers: dict[str, str] | None = None, body: Dataset | bytes = b""
) -> Answer:
    """Always the same response; a Dataset body is sent as DICOM JSON."""
    payload = json.dumps(body.to_json_dict()).encode() if isinstance(body, Dataset) else body
    return lambda request: (status, headers or (DICOM_JSON if payload else {}), payload)


def _failure_list(failed: dict[str, int], stored: dict[str, int] | None = None) -> Dataset:
    """A STOW-RS response body: Failed SOP Sequence with reasons, Referenced SOP Sequence."""
    answer = Dataset()
    answer.FailedSOPSequence = []
    for uid, reason in failed.items():
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
        item.ReferencedSOPInstanceUID = uid
        item.FailureReason = reason
        answer.FailedSOPSequence.append(item)
    answer.ReferencedSOPSequence = []
    for uid, warning in (stored or {}).items():
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
        item.ReferencedSOPInstanceUID = uid
        if warning:
            item.WarningReason = warning
        answer.ReferencedSOPSequence.append(item)
    return answer


@pytest.mark.skipif(not dicomweb_available(), reason="orthanc-dicomweb not installed")
def test_stow_into_orthanc_lands_in_the_study(tmp_path: Path) -> None:
    """Two SRs in one STOW-RS request are stored by Orthanc's DICOMweb plugin, in their study."""
    with Orthanc(tmp_path / "orthanc", {}, plugins=[DICOMWEB_PLUGIN]) as pacs:
        first = make_sr()
        second = make_sr(str(first.StudyInstanceUID))
        sink = DicomWebSink(pacs.dicomweb_url, timeout=10)
        assert sink.send([first, second]) == {
            str(first.SOPInstanceUID): 0,
            str(second.SOPInstanceUID): 0,
        }
        assert study_instances(pacs, str(first.StudyInstanceUID)) == {
            str(first.SOPInstanceUID),
            str(second.SOPInstanceUID),
        }
        # the same instances again: a resend is harmless (the caller's retries rely on it)
        sink.send([first])
        assert len(pacs.instances()) == 2


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, PermanentPushError),
        (401, PermanentPushError),
        (403, PermanentPushError),
        (404, PermanentPushError),
        (408, TransientPushError),
        (409, PermanentPushError),
        (415, PermanentPushError),
        (429, TransientPushError),
        (500, TransientPushError),
        (502, TransientPushError),
        (503, TransientPushError),
    ],
)
def test_http_statuses_are_classified(status: int, error: type[PushError]) -> None:
    """408, 429 and 5xx are retried; other 4xx (a 409 without a failure list) dead-lettered."""
    with HTTPReceiver(_answer(status, {"Retry-After": "3"}, b"patient CANARY^PHI")) as server:
        with pytest.raises(error) as caught:
            DicomWebSink(server.url, timeout=5).send([make_sr()])
        (request,) = server.requests
    assert type(caught.value) is error
    assert caught.value.status == status
    assert str(caught.value) == f"STOW-RS answered HTTP {status}"
    assert caught.value.retry_after == (3.0 if error is TransientPushError else None)
    assert request.path == "/studies"
    assert request.headers["Content-Type"].startswith("multipart/related")


@pytest.mark.parametrize(
    ("status", "reasons", "error"),
    [
        (409, [0xA700], TransientPushError),
        (409, [0xA7FF, 0x0213], TransientPushError),
        (409, [0xC000], PermanentPushError),
        (400, [0xA900], PermanentPushError),
        (202, [0xA700], TransientPushError),
        (202, [0xA700, 0xC122], PermanentPushError),
        (202, [0x0122], PermanentPushError),
        (200, [0x0110], PermanentPushError),
    ],
)
def test_failure_lists_are_classified(
    status: int, reasons: list[int], error: type[PushError]
) -> None:
    """A Failed SOP Sequence decides: transient only when every reason is out of resources;
    each failed UID and reason travels on the error, named in the message."""
    srs = [make_sr() for _ in reasons]
    failed = {str(sr.SOPInstanceUID): reason for sr, reason in zip(srs, reasons, strict=True)}
    with HTTPReceiver(_answer(status, body=_failure_list(failed))) as server:
        with pytest.raises(error) as caught:
            DicomWebSink(server.url, timeout=5).send(srs)
    assert type(caught.value) is error
    assert caught.value.failures == failed
    assert caught.value.status == status
    for reason in reasons:
        assert f"0x{reason:04X}" in str(caught.value)
    assert_no_phi(caught.value)


def test_warnings_are_done_and_returned() -> None:
    """A 202 with warnings only (0xB000 coercion) stored everything: the warnings come back."""
    sr = make_sr()
    body = _failure_list({}, {str(sr.SOPInstanceUID): 0xB000})
    headers = {"Content-Type": "application/dicom+json; charset=utf-8"}  # parameter tolerated
    with HTTPReceiver(_answer(202, headers, body)) as server:
        assert DicomWebSink(server.url, timeout=5).send([sr]) == {str(sr.SOPInstanceUID): 0xB000}


def test_failure_list_behind_a_charset_parameter_is_read() -> None:
    """dicomweb-client skips a body whose type has parameters; the sink still reads it."""
    sr = make_sr()
    body = _failure_list({str(sr.SOPInstanceUID): 0xC000})
    headers = {"Content-Type": "application/dicom+json; charset=utf-8"}
    with HTTPReceiver(_answer(202, headers, body)) as server:
        with pytest.raises(PermanentPushError, match="0xC000"):
            DicomWebSink(server.url, timeout=5).send([sr])


def test_unreadable_bodies() -> None:
    """200 means all stored, whatever its body; a 202 whose body cannot be read is permanent."""
    garbage = {"Content-Type": "application/dicom+json"}
    with HTTPReceiver(_answer(200, garbage, b"{not json")) as server:
        assert DicomWebSink(server.url, timeout=5).send([make_sr()]) == {}
    with HTTPReceiver(_answer(202, garbage, b"{not json")) as server:
        with pytest.raises(PermanentPushError, match="HTTP 202 with an unreadable body"):
            DicomWebSink(server.url, timeout=5).send([make_sr()])


def test_unreachable_and_slow_servers_are_transient() -> None:
    """A closed port and a server slower than the timeout are retried later; no retry inside."""
    with pytest.raises(TransientPushError, match="ConnectionError"):
        DicomWebSink(f"http://127.0.0.1:{free_port()}", timeout=2).send([make_sr()])

    def slow(request: Recorded) -> tuple[int, dict[str, str], bytes]:
        time.sleep(2.0)
        return 200, {}, b""

    sr = make_sr()
    with HTTPReceiver(slow) as server:
        started = time.monotonic()
        with pytest.raises(TransientPushError, match="Timeout"):
            DicomWebSink(server.url, timeout=0.3).send([sr])
        assert time.monotonic() - started < 1.5  # gave up before the answer came
    with HTTPReceiver(_answer(503)) as server:
        with pytest.raises(TransientPushError):
            DicomWebSink(server.url, timeout=5).send([make_sr()])
        assert len(server.requests) == 1  # dicomweb-client's own retries are off


def test_credentials_are_sent() -> None:
    """Bearer sends the token, basic the user and password, both from the settings' secrets."""
    with HTTPReceiver(_answer(200)) as server:
        bearer = DicomWebSinkSettings(url=server.url, auth="bearer", token=SecretStr("t0ken"))
        DicomWebSink.from_settings(bearer, token="t0ken").send([make_sr()])  # noqa: S106
        basic = DicomWebSinkSettings(
            url=server.url, auth="basic", username="pe", password_file=Path("/nonexistent")
        )
        DicomWebSink.from_settings(basic, password="pw").send([make_sr()])  # noqa: S106
        first, second = server.requests
    assert first.headers["Authorization"] == "Bearer t0ken"
    assert second.headers["Authorization"] == "Basic " + base64.b64encode(b"pe:pw").decode()


def test_settings_refuse_what_cannot_work() -> None:
    """No url: off; bearer without a token, basic without a user or password: refused."""
    with pytest.raises(ConfigError, match="off"):
        DicomWebSink.from_settings(DicomWebSinkSettings())
    with pytest.raises(ConfigError, match=r"sinks\.dicomweb: .*token"):
        DicomWebSinkSettings(url="https://pacs.example/dicom-web", auth="bearer")
    with pytest.raises(ConfigError, match=r"sinks\.dicomweb: .*username"):
        DicomWebSinkSettings(url="https://pacs.example/dicom-web", auth="basic")
    with pytest.raises(ConfigError, match=r"sinks\.dicomweb\.url"):
        DicomWebSink("ftp://pacs.example/dicom-web")
