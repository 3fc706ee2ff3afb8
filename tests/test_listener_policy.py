"""What the listener accepts, over real associations: every standard storage SOP class (retired
ones included), unknown ones only when configured, the called AE title enforced, the calling AE
allow-list (also from its env forms), and every refusal or rejection logged and recorded for
/status."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import redis
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from dicom_listener.server import Listener
from pipeline.errors import ConfigError
from pipeline.intake import IntakeLog
from pipeline.settings import Settings
from tests import factory
from tests.test_listener_slots import make_listener

RETIRED_US = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
PRIVATE = "1.3.6.1.4.1.99999.1.1"  # a vendor's own storage class


@pytest.fixture
def listener(tmp_path: Path, redis_server: str, redis_conn: redis.Redis) -> Iterator[Listener]:
    scp = make_listener(tmp_path, redis_server)
    scp.start()
    yield scp
    scp.stop()


def _send(
    listener: Listener, ds: pydicom.Dataset, *, called: str = "PACS_EMBED", sop_class: str = ""
) -> int | None:
    """C-STORE ``ds``; the status, or None when the association or context was refused."""
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(sop_class or ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    lsn = listener.settings.listener
    assoc = ae.associate("127.0.0.1", lsn.port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        if not assoc.accepted_contexts:
            return None
        response = assoc.send_c_store(ds)
        return int(response.Status) if "Status" in response else None
    finally:
        assoc.release()


def _summary(connection: redis.Redis, section: str, events: int) -> dict[str, Any]:
    """/status input once ``section`` counts ``events`` (at most 5 s): the listener records an
    event in its own thread, after the answer the sender already has."""
    deadline = time.monotonic() + 5.0
    while True:
        summary = IntakeLog(connection).summary()
        if sum(summary[section].values()) >= events or time.monotonic() > deadline:
            return summary
        time.sleep(0.05)


def _image(sop_class: str) -> pydicom.Dataset:
    ds = factory.ct_slice(study_uid="1.2.9", series_uid="1.2.9.1", instance_number=1, rows=8)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality = "US"
    return ds


def test_retired_storage_class_is_negotiated_and_stored(listener: Listener) -> None:
    """Retired US Image Storage, which pynetdicom leaves out, is accepted like any other."""
    ds = _image(RETIRED_US)
    assert _send(listener, ds) == 0x0000
    assert listener.spool.contains(ds.SOPInstanceUID)


def test_private_class_is_rejected_and_counted_by_default(
    listener: Listener, redis_conn: redis.Redis
) -> None:
    """An unknown SOP class's context is rejected (off by default), and /status says why."""
    assert _send(listener, _image(PRIVATE)) is None
    summary = _summary(redis_conn, "contexts_rejected", 1)
    assert summary["contexts_rejected"] == {"abstract syntax not supported": 1}
    [event] = summary["recent"]
    assert (event["calling_ae"], event["sop_class_uid"]) == ("SENDER", PRIVATE)


def test_private_class_is_stored_when_configured(
    tmp_path: Path, redis_server: str, redis_conn: redis.Redis
) -> None:
    """With accept_unknown_sop_classes, a vendor-private class is negotiated and stored."""
    scp = make_listener(tmp_path, redis_server, accept_unknown_sop_classes=True)
    scp.start()
    try:
        assert _send(scp, _image(PRIVATE)) == 0x0000
        assert _send(scp, _image(RETIRED_US)) == 0x0000
    finally:
        scp.stop()


def test_wrong_called_ae_title_is_rejected_and_recorded(
    listener: Listener, redis_conn: redis.Redis
) -> None:
    """An association addressed to another AE title is rejected, with the reason recorded."""
    assert _send(listener, _image(RETIRED_US), called="SOMEONE_ELSE") is None
    summary = _summary(redis_conn, "associations_rejected", 1)
    assert summary["associations_rejected"] == {"called AE title not recognised": 1}
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.settings.listener.port, ae_title="PACS_EMBED")
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_overlong_command_uid_gets_0xc000_not_an_abort(
    listener: Listener, redis_conn: redis.Redis
) -> None:
    """A command UID over 64 characters is answered 0xC000 on a live association, and counted."""
    ds = _image(RETIRED_US)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom, as the sender, warns about what it sends
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1." + "2" * 80
        assert _send(listener, ds) == 0xC000
    refused = IntakeLog(redis_conn).summary()["refused"]
    assert refused == {"0xC000: Affected SOP Instance UID is longer than 64 characters (82)": 1}


ALLOW_LIST_ENV = "PACS_EMBED_LISTENER__ALLOWED_CALLING_AETS"


@pytest.mark.parametrize(
    "value", ["PACS1,PACS2", " PACS1 , PACS2 ", '["PACS1", "PACS2"]', "PACS1,,PACS2,"]
)
def test_allow_list_from_env_comma_separated_or_json(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """PACS_EMBED_LISTENER__ALLOWED_CALLING_AETS takes PACS1,PACS2 as well as a JSON list."""
    monkeypatch.setenv(ALLOW_LIST_ENV, value)
    assert Settings.load().listener.allowed_calling_aets == ["PACS1", "PACS2"]


@pytest.mark.parametrize(("value", "expected"), [("PACS1", ["PACS1"]), ("", []), ("[]", [])])
def test_allow_list_env_single_title_or_empty(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    """One title is a list of one; an empty value (or []) accepts any calling AE."""
    monkeypatch.setenv(ALLOW_LIST_ENV, value)
    assert Settings.load().listener.allowed_calling_aets == expected


@pytest.mark.parametrize("value", ["PACS1,A_TITLE_LONGER_THAN_16", '["PACS1"', "PACS\\1"])
def test_bad_allow_list_names_the_setting(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """A title that is not an AE title, or broken JSON, is a ConfigError naming the key."""
    monkeypatch.setenv(ALLOW_LIST_ENV, value)
    with pytest.raises(ConfigError, match=r"listener\.allowed_calling_aets"):
        Settings.load()


def test_rejected_calling_ae_is_logged_with_address_and_recorded(
    tmp_path: Path, redis_server: str, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the allow-list from env (PACS1,PACS2): PACS2 is served; STRANGER gets A-ASSOCIATE-RJ
    "calling-AE-title-not-recognized", and the log line and /status name its calling AE title
    and address."""
    monkeypatch.setenv(ALLOW_LIST_ENV, "PACS1,PACS2")
    scp = make_listener(tmp_path, redis_server)
    scp.start()
    with capture_logs() as logs:
        try:
            port = scp.settings.listener.port
            allowed = AE(ae_title="PACS2")
            allowed.add_requested_context(Verification)
            assoc = allowed.associate("127.0.0.1", port, ae_title="PACS_EMBED")
            assert assoc.is_established
            assoc.release()
            stranger = AE(ae_title="STRANGER")
            stranger.add_requested_context(Verification)
            assoc = stranger.associate("127.0.0.1", port, ae_title="PACS_EMBED")
            assert assoc.is_rejected
            answer = assoc.acceptor.primitive
            assert answer is not None
            assert (answer.result, answer.result_source, answer.diagnostic) == (0x01, 0x01, 0x03)
        finally:
            scp.stop()  # waits for every connection's thread: everything is logged by then
    [line] = [entry for entry in logs if entry["event"] == "association.rejected"]
    assert line["calling_ae"] == "STRANGER" and line["address"] == "127.0.0.1", line
    assert (line["called_ae"], line["reason"]) == ("PACS_EMBED", "calling AE title not allowed")
    summary = IntakeLog(redis_conn).summary()
    assert summary["associations_rejected"] == {"calling AE title not allowed": 1}
    [event] = summary["recent"]
    assert (event["calling_ae"], event["address"]) == ("STRANGER", "127.0.0.1")


def test_the_association_offers_the_configured_maximum_pdu(listener: Listener) -> None:
    """The A-ASSOCIATE-AC carries ``listener.max_pdu_bytes`` (1 MiB by default, not pynetdicom's
    16382), so a sender puts a 512 KB slice in one PDU instead of 32."""
    ae = AE()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.settings.listener.port, ae_title="PACS_EMBED")
    try:
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == listener.settings.listener.max_pdu_bytes == 1 << 20
    finally:
        assoc.release()
