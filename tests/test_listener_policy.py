"""What the listener accepts, over real associations: every standard storage SOP class (retired
ones included), unknown ones only when configured, the called AE title enforced, and every
refusal or rejection recorded for /status."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import redis
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_listener.server import Listener
from pipeline.intake import IntakeLog
from pipeline.settings import Settings
from tests import factory
from tests.conftest import free_port

RETIRED_US = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
PRIVATE = "1.3.6.1.4.1.99999.1.1"  # a vendor's own storage class


def _listener(tmp_path: Path, url: str, **listener: object) -> Listener:
    settings = Settings.load(
        state_dir=tmp_path,
        redis={"url": url},
        listener={"host": "127.0.0.1", "port": free_port(), "min_free_disk_mb": 1, **listener},
        log={"level": "warning"},
    )
    return Listener(settings, redis.Redis.from_url(url))


@pytest.fixture
def listener(tmp_path: Path, redis_server: str, redis_conn: redis.Redis) -> Iterator[Listener]:
    scp = _listener(tmp_path, redis_server)
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
    summary = IntakeLog(redis_conn).summary()
    assert summary["contexts_rejected"] == {"abstract syntax not supported": 1}
    [event] = summary["recent"]
    assert (event["calling_ae"], event["sop_class_uid"]) == ("SENDER", PRIVATE)


def test_private_class_is_stored_when_configured(
    tmp_path: Path, redis_server: str, redis_conn: redis.Redis
) -> None:
    """With accept_unknown_sop_classes, a vendor-private class is negotiated and stored."""
    scp = _listener(tmp_path, redis_server, accept_unknown_sop_classes=True)
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
    summary = IntakeLog(redis_conn).summary()
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
