"""The C-STORE path without sockets: UID checks, status mapping, spool durability, back-pressure."""

from __future__ import annotations

import errno
import io
import os
import threading
import tracemalloc
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicom_listener.door import Doorman
from dicom_listener.handlers import handle_store, refused_by_title, rejection_reason
from dicom_listener.spool import Spool
from dicom_listener.status import StoreStatus, status_for
from pipeline.errors import SpoolError
from pipeline.intake import Event as IntakeEvent
from pipeline.intake import Kind
from pipeline.sections import ListenerSettings
from pipeline.uids import is_safe_uid, is_valid_uid, job_id
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
        # What pynetdicom hands over: the data set without File Meta, and its syntax.
        offset, syntax = 0, pydicom.uid.ExplicitVRLittleEndian
        if self.data[128:132] == b"DICM":
            offset = 144 + int.from_bytes(self.data[140:144], "little")
            meta = pydicom.filereader._read_file_meta_info(io.BytesIO(self.data[132:offset]))
            syntax = meta.TransferSyntaxUID
        self.request = SimpleNamespace(
            AffectedSOPInstanceUID=self.sop_uid,
            AffectedSOPClassUID=self.sop_class,
            DataSet=io.BytesIO(self.data[offset:]),
        )
        self.context = SimpleNamespace(transfer_syntax=syntax)
        self.assoc = SimpleNamespace(
            requestor=SimpleNamespace(ae_title="STORESCU", address="127.0.0.1", primitive=None)
        )

    def encoded_dataset(self) -> bytes:
        return self.data


class Intake:
    """Collects what the handler records, as IntakeLog would in Redis."""

    def __init__(self) -> None:
        self.events: list[IntakeEvent] = []

    def record(self, event: IntakeEvent) -> None:
        self.events.append(event)


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


def store(
    event: FakeEvent, spool: Spool, gate: Open | None = None, intake: Intake | None = None
) -> tuple[int, list[Path]]:
    submitted: list[Path] = []
    status = handle_store(
        event,  # type: ignore[arg-type]
        spool,
        gate or Open(),
        submitted.append,
        intake or Intake(),  # type: ignore[arg-type]
    )
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


UNSAFE_UIDS = ["", None, "1.2/../3", "..", "1.2\\3.4", "1.2.3\x00", "1.2.\u00e93", "1." + "2" * 70]


@pytest.mark.parametrize("bad_uid", UNSAFE_UIDS)
def test_unsafe_uid_cannot_understand(spool: Spool, ct: pydicom.Dataset, bad_uid: Any) -> None:
    """A missing or unsafe Affected SOP Instance UID is 0xC000, recorded, and nothing written."""
    intake = Intake()
    status, submitted = store(FakeEvent(encode(ct), bad_uid, ct.SOPClassUID), spool, None, intake)
    assert status == StoreStatus.CANNOT_UNDERSTAND == 0xC000
    assert submitted == [] and list(spool.walk()) == []
    [event] = intake.events
    assert event.kind == Kind.REFUSED and event.status == "0xC000"
    assert event.reason.startswith("Affected SOP Instance UID is ")
    assert event.calling_ae == "STORESCU" and event.sop_class_uid == ct.SOPClassUID


@pytest.mark.parametrize("odd_uid", ["1.2.03", "1..2", "x.y", "a1b2" * 16, "1.2.3-4_5"])
def test_nonconformant_but_safe_uid_is_accepted(
    spool: Spool, ct: pydicom.Dataset, odd_uid: str
) -> None:
    """A UID that breaks the UI grammar but is safe is stored (the PACS stored it), counted, and
    never names a file as is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the grammar: that is the point
        ct.SOPInstanceUID = odd_uid
        ct.file_meta.MediaStorageSOPInstanceUID = odd_uid
        data = encode(ct)
    intake = Intake()
    status, submitted = store(FakeEvent(data, odd_uid, ct.SOPClassUID), spool, None, intake)
    assert status == StoreStatus.SUCCESS and len(submitted) == 1
    assert [e.kind for e in intake.events] == [Kind.NONCONFORMANT_UID]
    assert odd_uid not in submitted[0].name and Spool.uid_of(submitted[0]) == odd_uid
    assert spool.contains(odd_uid)


def test_concurrent_sends_of_one_instance_are_handed_on_once(
    spool: Spool, ct: pydicom.Dataset
) -> None:
    """Twelve associations sending the same instance at once: all acknowledged, one converted."""
    event = FakeEvent(encode(ct), ct.SOPInstanceUID, ct.SOPClassUID)
    submitted: list[Path] = []
    barrier = threading.Barrier(12)

    def send() -> int:
        barrier.wait()
        return int(handle_store(event, spool, Open(), submitted.append, Intake()))  # type: ignore[arg-type]

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _i: send(), range(12)))
    assert statuses == [StoreStatus.SUCCESS] * 12
    assert submitted == [spool.path_for(ct.SOPInstanceUID)]


def test_resend_of_a_quarantined_instance_supersedes_it(spool: Spool, ct: pydicom.Dataset) -> None:
    """A corrected resend is accepted and processed again; the stale quarantined copy goes."""
    event = FakeEvent(encode(ct), ct.SOPInstanceUID, ct.SOPClassUID)
    [path] = store(event, spool)[1]
    spool.quarantine(ct.SOPInstanceUID, path, "conversion: bad")
    assert spool.quarantined() == 1
    status, submitted = store(event, spool)
    assert status == StoreStatus.SUCCESS and submitted == [path]
    assert spool.quarantined() == 0 and list(spool.quarantine_root.iterdir()) == []


def test_deflate_bomb_is_not_inflated_by_the_handler(spool: Spool, ct: pydicom.Dataset) -> None:
    """A deflated data set that inflates to 256 MiB costs the handler kilobytes, not gigabytes."""
    ct.PixelData = b"\0" * 32 * 32 * 2
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    ct.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    pydicom.filewriter.write_dataset(head, ct)
    # An element of 1 GiB of zeros after the real ones, deflated (about 1 MB on the wire).
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [
        compressor.compress(
            head.getvalue() + b"\x09\x00\x10\x10OB\0\0" + (1 << 28).to_bytes(4, "little")
        )
    ]
    zeros = b"\0" * (1 << 20)
    chunks += [compressor.compress(zeros) for _ in range(256)]
    chunks.append(compressor.flush())
    meta = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(meta, ct.file_meta, enforce_standard=True)
    data = b"\0" * 128 + b"DICM" + meta.getvalue() + b"".join(chunks)
    assert len(data) < 2_000_000
    tracemalloc.start()
    try:
        status, submitted = store(FakeEvent(data, ct.SOPInstanceUID, ct.SOPClassUID), spool)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == StoreStatus.SUCCESS and len(submitted) == 1  # conversion refuses it later
    assert peak < 3 * len(data) + 1_000_000


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
    spool.tmp.rmdir()  # the partial file cannot be created now
    status, submitted = store(FakeEvent(encode(ct), ct.SOPInstanceUID, ct.SOPClassUID), spool)
    assert status == StoreStatus.OUT_OF_RESOURCES and submitted == []
    assert status_for(SpoolError("x")) == (StoreStatus.OUT_OF_RESOURCES, "x")


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


@pytest.mark.parametrize("series", ["1.2.3/../4", "1.2.3\\4.5.6", "a b", "x" * 64])
def test_job_ids_never_carry_raw_header_text(series: str) -> None:
    """Whatever the Series UID holds, the job id is rq-safe and stable (the wedge of issue 8)."""
    jid = job_id("embed", series, ["1.2.3.4"])
    assert set(jid) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    assert jid == job_id("embed", series, ["1.2.3.4"]) and series not in jid


def test_uid_validation_and_job_ids() -> None:
    """UIDs are checked per PS3.5; job ids use only rq's [A-Za-z0-9_-] and name the set."""
    assert is_valid_uid("1.2.840.10008.1.1")
    assert not is_valid_uid("1.2.840.10008.1.1 ")
    assert is_safe_uid("0A1B" * 16) and not is_safe_uid("1.2/3") and not is_safe_uid("1" * 65)
    jid = job_id("embed", "1.2.3", ["1.2.3.4", "1.2.3.5"])
    assert jid.startswith("embed-1-2-3-")
    assert set(jid) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    assert jid == job_id("embed", "1.2.3", ["1.2.3.5", "1.2.3.4"])
    assert jid != job_id("embed", "1.2.3", ["1.2.3.4"])


def test_spool_works_where_hard_links_do_not(
    spool: Spool, ct: pydicom.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a filesystem without hard links (link() -> EPERM), instances are still spooled once."""

    def no_links(_src: str, _dst: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    event = FakeEvent(encode(ct), ct.SOPInstanceUID, ct.SOPClassUID)
    status, submitted = store(event, spool)
    assert status == StoreStatus.SUCCESS and submitted == [spool.path_for(ct.SOPInstanceUID)]
    assert submitted[0].read_bytes() == event.data and list(spool.tmp.iterdir()) == []
    assert store(event, spool) == (StoreStatus.SUCCESS, [])  # a resend is still a resend


# -- the door: slots, per-peer connections, rejection reasons -------------------------------------


def test_doorman_counts_connections_per_address_and_slots_per_association() -> None:
    """A peer's connections past its limit are refused (and not counted); association slots
    are claimed up to max_associations and given back, each association once."""
    door = Doorman(ListenerSettings(max_connections_per_peer=2, max_associations=1))
    assert [door.admit("10.0.0.1") for _ in range(3)] == [(True, 1), (True, 2), (False, 3)]
    assert door.admit("10.0.0.2") == (True, 1)  # another address has its own limit
    door.leave("10.0.0.1")
    assert door.admit("10.0.0.1") == (True, 2) and door.connections("10.0.0.1") == 2
    first, second = object(), object()
    assert door.claim(first) == (True, 1)  # type: ignore[arg-type]
    assert door.claim(second) == (False, 1)  # type: ignore[arg-type]
    door.release(first)  # type: ignore[arg-type]
    door.release(first)  # type: ignore[arg-type] # twice: no effect
    assert door.claim(second) == (True, 1)  # type: ignore[arg-type]


def _assoc(
    calling: str = "PACS1",
    called: str = "PACS_EMBED",
    allowed: list[str] | None = None,
    answer: tuple[int, int] | None = None,
) -> Any:
    request = SimpleNamespace(calling_ae_title=calling, called_ae_title=called)
    rejection = (
        None if answer is None else SimpleNamespace(result_source=answer[0], diagnostic=answer[1])
    )
    return SimpleNamespace(
        ae=SimpleNamespace(require_calling_aet=allowed or [], require_called_aet=True),
        requestor=SimpleNamespace(primitive=request, ae_title=calling, address="10.0.0.1"),
        acceptor=SimpleNamespace(ae_title="PACS_EMBED", primitive=rejection),
    )


def test_requests_refused_by_title_are_known_before_negotiation() -> None:
    """The requests pynetdicom will reject for their AE titles, so they never take a slot."""
    assert not refused_by_title(_assoc())
    assert not refused_by_title(_assoc(allowed=["PACS1", "PACS2"]))
    assert refused_by_title(_assoc(calling="OTHER", allowed=["PACS1"]))
    assert refused_by_title(_assoc(called="SOMEONE_ELSE"))


def test_rejection_reason_is_read_from_the_a_associate_rj() -> None:
    """/status names the reason the A-ASSOCIATE-RJ carried (PS3.8 9.3.4), not a guess."""
    assert rejection_reason(_assoc(answer=(0x01, 0x03))) == "calling AE title not allowed"
    assert rejection_reason(_assoc(answer=(0x01, 0x07))) == "called AE title not recognised"
    assert rejection_reason(_assoc(answer=(0x03, 0x02))) == "local limit exceeded"
    assert rejection_reason(_assoc(answer=(0x02, 0x09))) == "source 2, reason 9"
    assert rejection_reason(_assoc()) == "no reason given"  # no A-ASSOCIATE-RJ recorded
