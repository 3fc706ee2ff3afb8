"""The C-STORE path without sockets: UID checks, status mapping, spool durability, back-pressure."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicom_listener.handlers import handle_store
from dicom_listener.spool import Spool
from dicom_listener.status import StoreStatus, status_for
from pipeline.errors import SpoolError
from pipeline.uids import is_valid_uid, job_id
from tests import factory


def encode(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class FakeEvent:
    """Duck-types the bits of pynetdicom's Event the handler reads."""

    data: bytes
    sop_uid: Any
    sop_class: Any
    request: Any = field(init=False)
    assoc: Any = field(init=False)

    def __post_init__(self) -> None:
        self.request = SimpleNamespace(
            AffectedSOPInstanceUID=self.sop_uid, AffectedSOPClassUID=self.sop_class
        )
        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="STORESCU"))

    def encoded_dataset(self) -> bytes:
        return self.data


class Open:
    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason

    def refuse_reason(self) -> str | None:
        return self.reason


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", tmp_path / "quarantine")


@pytest.fixture
def ct() -> pydicom.Dataset:
    return factory.ct_slice(
        study_uid=factory.new_uid(),
        series_uid=factory.new_uid(),
        instance_number=1,
        rows=32,
        columns=32,
    )


def store(event: FakeEvent, spool: Spool, gate: Open | None = None) -> tuple[int, list[Path]]:
    submitted: list[Path] = []
    status = handle_store(event, spool, gate or Open(), submitted.append)  # type: ignore[arg-type]
    return status, submitted


def test_valid_instance_is_spooled_then_acknowledged(spool: Spool, ct: pydicom.Dataset) -> None:
    """Success only with the exact received bytes on disk, and the path handed on."""
    data = encode(ct)
    status, submitted = store(FakeEvent(data, ct.SOPInstanceUID, ct.SOPClassUID), spool)
    assert status == StoreStatus.SUCCESS
    assert submitted == [spool.path_for(ct.SOPInstanceUID)]
    assert submitted[0].read_bytes() == data
    assert list(spool.tmp.iterdir()) == []


def test_resent_instance_is_acknowledged_not_resubmitted(spool: Spool, ct: pydicom.Dataset) -> None:
    """Idempotent by SOP Instance UID: the second copy gets 0x0000 and no new work."""
    event = FakeEvent(encode(ct), ct.SOPInstanceUID, ct.SOPClassUID)
    assert store(event, spool)[1]
    status, submitted = store(event, spool)
    assert status == StoreStatus.SUCCESS and submitted == []


@pytest.mark.parametrize("bad_uid", ["", None, "1.2.03", "1..2", "x.y", "1." + "2" * 70])
def test_invalid_uid_cannot_understand(spool: Spool, ct: pydicom.Dataset, bad_uid: Any) -> None:
    """A missing or malformed Affected SOP Instance UID is 0xC000 and nothing is written."""
    status, submitted = store(FakeEvent(encode(ct), bad_uid, ct.SOPClassUID), spool)
    assert status == StoreStatus.CANNOT_UNDERSTAND == 0xC000
    assert submitted == [] and list(spool.walk()) == []


def test_unparseable_dataset_cannot_understand(spool: Spool, ct: pydicom.Dataset) -> None:
    """Bytes that are not a data set get 0xC000, never an exception out of the handler."""
    status, _ = store(FakeEvent(b"\x00garbage" * 10, ct.SOPInstanceUID, ct.SOPClassUID), spool)
    assert status == StoreStatus.CANNOT_UNDERSTAND


def test_sop_class_mismatch(spool: Spool, ct: pydicom.Dataset) -> None:
    """Data set of another SOP class than the command announced: 0xA900."""
    mr_class = "1.2.840.10008.5.1.4.1.1.4"
    status, _ = store(FakeEvent(encode(ct), ct.SOPInstanceUID, mr_class), spool)
    assert status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900


def test_instance_uid_mismatch(spool: Spool, ct: pydicom.Dataset) -> None:
    """Data set whose SOP Instance UID differs from the command's: 0xC000, nothing spooled."""
    status, submitted = store(FakeEvent(encode(ct), factory.new_uid(), ct.SOPClassUID), spool)
    assert status == StoreStatus.CANNOT_UNDERSTAND and submitted == []


def test_back_pressure_out_of_resources(spool: Spool, ct: pydicom.Dataset) -> None:
    """A refusing gate (low disk, deep backlog) gives 0xA700, which senders retry."""
    event = FakeEvent(encode(ct), ct.SOPInstanceUID, ct.SOPClassUID)
    status, submitted = store(event, spool, Open("free disk under the watermark"))
    assert status == StoreStatus.OUT_OF_RESOURCES == 0xA700 and submitted == []


def test_spool_failure_out_of_resources(spool: Spool, ct: pydicom.Dataset) -> None:
    """If the spool cannot write (disk full, permissions), the sender gets 0xA700, not success."""
    spool.tmp.rmdir()  # mkstemp now fails
    status, submitted = store(FakeEvent(encode(ct), ct.SOPInstanceUID, ct.SOPClassUID), spool)
    assert status == StoreStatus.OUT_OF_RESOURCES and submitted == []
    assert status_for(SpoolError("x")) == StoreStatus.OUT_OF_RESOURCES


def test_our_codes_are_failures_in_pynetdicoms_storage_table() -> None:
    """Each named status is the PS3.4 storage failure pynetdicom knows; no warnings used."""
    for status in StoreStatus:
        expected = "Success" if status == StoreStatus.SUCCESS else "Failure"
        assert code_to_category(int(status)) == expected
        assert int(status) in STORAGE_SERVICE_CLASS_STATUS


def test_spool_walk_and_clean_tmp(spool: Spool) -> None:
    """walk() sees only complete instances; clean_tmp() drops partial writes of a crash."""
    uid = factory.new_uid()
    spool.write(uid, b"data")
    (spool.tmp / "x.part").write_bytes(b"half")
    assert [p.name for p in spool.walk()] == [f"{uid}.dcm"]
    assert spool.clean_tmp() == 1


def test_quarantine_keeps_the_reason(spool: Spool) -> None:
    """A quarantined instance leaves the spool, with its reason in a JSON note beside it."""
    uid = factory.new_uid()
    path = spool.write(uid, b"data")
    target = spool.quarantine(uid, path, "conversion: bad Bits Allocated")
    assert not path.exists() and target.read_bytes() == b"data"
    assert "bad Bits Allocated" in (target.with_suffix(".json")).read_text()
    assert spool.quarantined() == 1


def test_uid_validation_and_job_ids() -> None:
    """UIDs are checked per PS3.5; job ids use only rq's [A-Za-z0-9_-] and name the set."""
    assert is_valid_uid("1.2.840.10008.1.1")
    assert not is_valid_uid("1.2.840.10008.1.1 ")
    jid = job_id("embed", "1.2.3", ["1.2.3.4", "1.2.3.5"])
    assert jid.startswith("embed-1-2-3-")
    assert set(jid) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    assert jid == job_id("embed", "1.2.3", ["1.2.3.5", "1.2.3.4"])
    assert jid != job_id("embed", "1.2.3", ["1.2.3.4"])
