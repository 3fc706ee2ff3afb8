"""Hostile DICOM input, and a hostile sender: what a broken or malicious peer puts on the wire.

Everything is generated in memory and deterministically (UIDs are derived from case labels, pixel
data from fixed seeds), so two runs send byte-identical objects. Every object starts as a valid
image carrying the fake patient below, so a leak of patient data into logs, Redis or /status is
visible; the hostile part is then crafted at the byte level (truncations, lengths, UIDs) because
pydicom refuses to write most of it.

The sender does what a careless or malicious SCU does and pynetdicom's ``send_c_store`` will not:
any command UID (too long, with '/', control characters, empty), any data set bytes under any
accepted presentation context, and any called AE title (raw A-ASSOCIATE-RQ over a socket).

Over the network only the data set travels: there is no File Meta. "Bad transfer syntaxes in the
file meta" therefore become what a peer can actually do: propose unknown or retired transfer
syntaxes, or send bytes that do not match the transfer syntax of the context they travel in.
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO

import pydicom
import pydicom.config
import redis
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    UltrasoundMultiFrameImageStorage,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

from pipeline import keys
from tests import factory

# -- the fake patient ---------------------------------------------------------------------------
PATIENT_NAME = "HOSTILE^PATIENT^X"
PATIENT_ID = "PID-HOSTILE-4711"
PATIENT_BIRTH_DATE = "19230405"
ACCESSION_NUMBER = "ACC-HOSTILE-0815"
PHI = (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, ACCESSION_NUMBER)
#: Parts that identify the patient on their own. "HOSTILE" is matched anywhere (upper case: no
#: identifier of ours uses it); the digit runs only as a token of their own, so a timestamp or a
#: long UID that happens to contain "4711" is not a finding, but "-4711" or "=0815" is.
PHI_PARTS = ("HOSTILE", "4711", "19230405", "0815")
_PHI_RE = re.compile(
    "|".join(
        [re.escape(value) for value in PHI]
        + ["HOSTILE"]
        + [rf"(?<![0-9A-Za-z]){part}(?![0-9A-Za-z])" for part in PHI_PARTS[1:]]
    )
)


def find_phi(text: str) -> list[str]:
    """Every fake-patient string (or part) in ``text``, with 30 characters of context each."""
    return [
        text[max(0, m.start() - 30) : m.end() + 30].replace("\n", " ")
        for m in _PHI_RE.finditer(text)
    ]


# -- statuses and expected outcomes -------------------------------------------------------------
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_MISMATCH = 0xA900
#: Outcome "status" of a case whose presentation context the daemon rejected: nothing was sent.
CONTEXT_REJECTED = -1
#: pynetdicom's own answers to a sender's DIMSE protocol error, before any handler of ours runs:
#: a command whose SOP Class UID maps to no service (it differs from the context's abstract
#: syntax) aborts the association; a request missing a required UID is ignored, so the sender's
#: DIMSE timeout ends it. Nothing is stored either way and other associations are unaffected.
PROTOCOL_ABORT = -2
NO_ANSWER = -3

EMBEDDED = frozenset({"embedded"})
FAILED = frozenset({"failed"})
NOT_EMBEDDED = frozenset({"failed", "skipped"})
ANY_FINAL = frozenset({"embedded", "skipped", "failed"})
ACK_OR_REFUSE = frozenset({SUCCESS, CANNOT_UNDERSTAND})

#: Context proposed with an unknown transfer syntax, and a retired one (JPEG Extended 3 & 5).
UNKNOWN_TS = "1.2.840.99999.7.1.2"
RETIRED_TS = "1.2.840.10008.1.2.4.52"

ROWS = COLUMNS = 64


@dataclass(frozen=True)
class Case:
    """One C-STORE a hostile peer sends, and what the daemon must answer."""

    name: str
    group: str
    #: The command's Affected SOP Class / Instance UIDs, as sent (may be anything).
    sop_class_uid: str
    sop_instance_uid: str
    #: The data set exactly as it goes on the wire.
    data: bytes = field(repr=False)
    #: The presentation context it travels in.
    abstract_syntax: str = CTImageStorage
    transfer_syntax: str = ExplicitVRLittleEndian
    #: Acceptable C-STORE statuses, and acceptable final states once acknowledged (0x0000).
    statuses: frozenset[int] = ACK_OR_REFUSE
    finals: frozenset[str] = FAILED
    #: A UID that breaks PS3.5 but is safe as a name: the daemon must take it (and count it).
    nonconformant: bool = False
    #: Sent on an association of its own (in parallel): it may never be answered.
    alone: bool = False

    @property
    def ledger_uid(self) -> str:
        """The UID the daemon files an acknowledged instance under: pynetdicom hands it only
        the first value of a multi-valued (backslash) command UID."""
        return self.sop_instance_uid.split("\\")[0]

    @property
    def must_refuse(self) -> bool:
        return SUCCESS not in self.statuses


def uid(label: str) -> str:
    """A deterministic 2.25 UID for ``label``, free of anything ``find_phi`` would report."""
    for attempt in range(100):
        digest = hashlib.sha256(f"hostile/{label}/{attempt}".encode()).hexdigest()
        value = f"2.25.{int(digest[:30], 16)}"
        if not find_phi(value) and "4711" not in value and "0815" not in value:
            return value
    raise AssertionError(f"no PHI-free UID for {label}")  # pragma: no cover


def hex_uid(label: str) -> str:
    """64 lower-case hex characters: not a DICOM UID at all, but harmless as a name."""
    for attempt in range(100):
        value = hashlib.sha256(f"hostile-hex/{label}/{attempt}".encode()).hexdigest()
        if "4711" not in value and "0815" not in value:
            return value
    raise AssertionError(f"no PHI-free hex UID for {label}")  # pragma: no cover


# -- valid starting points ----------------------------------------------------------------------
def _stamp(ds: pydicom.Dataset, label: str) -> pydicom.Dataset:
    """Deterministic UIDs (from ``label``) and the fake patient, replacing the factory's."""
    sop = uid(f"{label}/sop")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.StudyInstanceUID = uid(f"{label}/study")
    ds.SeriesInstanceUID = uid(f"{label}/series")
    ds.FrameOfReferenceUID = uid(f"{label}/for")
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.AccessionNumber = ACCESSION_NUMBER
    ds.OtherPatientIDs = PATIENT_ID
    ds.ImageComments = f"patient {PATIENT_NAME} born {PATIENT_BIRTH_DATE}"
    return ds


def ct(label: str, seed: int = 0) -> pydicom.Dataset:
    """A valid 64x64 CT slice with the fake patient."""
    ds = factory.ct_slice(
        study_uid=uid(f"{label}/study"),
        series_uid=uid(f"{label}/series"),
        instance_number=1,
        rows=ROWS,
        columns=COLUMNS,
        seed=seed,
        sop_instance_uid=uid(f"{label}/sop"),
    )
    return _stamp(ds, label)


def multiframe(label: str, frames: int = 4) -> pydicom.Dataset:
    """A valid 8-bit 16x16 multi-frame US with the fake patient."""
    return _stamp(factory.mono_multiframe(frames=frames, rows=16, columns=16), label)


def encoded(ds: pydicom.Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set as it goes on the wire in ``transfer_syntax`` (Deflated: raw deflate)."""
    ts = UID(transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian:
        return deflate(encoded(ds, ExplicitVRLittleEndian))
    data = encode(ds, ts.is_implicit_VR, ts.is_little_endian)
    assert data is not None, f"pynetdicom could not encode {ds.SOPInstanceUID}"
    return data


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


# -- byte-level surgery -------------------------------------------------------------------------
#: Explicit VRs with a 4-byte length (after 2 reserved bytes).
_LONG_VRS = {
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"
}  # fmt: skip


@dataclass(frozen=True)
class Element:
    tag: int
    start: int  # offset of the tag
    value_start: int
    length: int  # as declared
    length_at: int  # offset of the length field
    length_size: int  # 2 or 4 bytes

    @property
    def end(self) -> int:
        return self.value_start + self.length


def _layout(transfer_syntax: str) -> tuple[str, bool]:
    ts = UID(transfer_syntax)
    return ("<" if ts.is_little_endian else ">"), ts.is_implicit_VR


def elements(data: bytes, transfer_syntax: str = ExplicitVRLittleEndian) -> list[Element]:
    """Top-level elements of a data set without sequences or undefined lengths (ours)."""
    order, implicit = _layout(transfer_syntax)
    out, pos = [], 0
    while pos < len(data):
        group, number = struct.unpack_from(order + "HH", data, pos)
        if implicit:
            at, size = pos + 4, 4
        elif data[pos + 4 : pos + 6] in _LONG_VRS:
            at, size = pos + 8, 4
        else:
            at, size = pos + 6, 2
        (length,) = struct.unpack_from(order + ("L" if size == 4 else "H"), data, at)
        out.append(Element((group << 16) | number, pos, at + size, length, at, size))
        pos = at + size + length
    return out


def element(data: bytes, tag: int, transfer_syntax: str = ExplicitVRLittleEndian) -> Element:
    for el in elements(data, transfer_syntax):
        if el.tag == tag:
            return el
    raise KeyError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) not in the data set")


def set_length(
    data: bytes, tag: int, length: int, transfer_syntax: str = ExplicitVRLittleEndian
) -> bytes:
    """Lie about one element's length; the bytes stay where they are."""
    el = element(data, tag, transfer_syntax)
    order, _ = _layout(transfer_syntax)
    packed = struct.pack(order + ("L" if el.length_size == 4 else "H"), length)
    return data[: el.length_at] + packed + data[el.value_start :]


def replace_value(
    data: bytes, tag: int, value: bytes, transfer_syntax: str = ExplicitVRLittleEndian
) -> bytes:
    """Give one element any value (padded with NUL to even length), its length fixed up."""
    el = element(data, tag, transfer_syntax)
    value += b"\0" * (len(value) % 2)
    order, _ = _layout(transfer_syntax)
    packed = struct.pack(order + ("L" if el.length_size == 4 else "H"), len(value))
    return data[: el.length_at] + packed + value + data[el.end :]


def remove(data: bytes, tag: int, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    el = element(data, tag, transfer_syntax)
    return data[: el.start] + data[el.end :]


def with_uid(data: bytes, tag: int, value: str, ts: str = ExplicitVRLittleEndian) -> bytes:
    return replace_value(data, tag, value.encode("latin-1"), ts)


# Tags used below.
SOP_CLASS = 0x00080016
SOP_INSTANCE = 0x00080018
MODALITY = 0x00080060
PATIENT_NAME_TAG = 0x00100010
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SLICE_THICKNESS = 0x00180050
NUMBER_OF_FRAMES = 0x00280008
ROWS_TAG = 0x00280010
COLUMNS_TAG = 0x00280011
PIXEL_DATA = 0x7FE00010


def _last_of_group(data: bytes, group: int) -> Element:
    return [el for el in elements(data) if el.tag >> 16 == group][-1]


# -- the cases ----------------------------------------------------------------------------------
def _case(
    name: str,
    group: str,
    data: bytes,
    *,
    sop_uid: str,
    sop_class: str = CTImageStorage,
    **kw: object,
) -> Case:
    return Case(name, group, sop_class, sop_uid, data, **kw)  # type: ignore[arg-type]


def truncations() -> list[Case]:
    """One valid CT cut at every element boundary, in three encodings, and a few mid-element."""
    cases = []
    for ts, short in (
        (ExplicitVRLittleEndian, "evrle"),
        (ImplicitVRLittleEndian, "ivrle"),
        (ExplicitVRBigEndian, "evrbe"),
    ):
        count = len(elements(encoded(ct("probe"), ts), ts))
        for i in range(1, count):  # 0 (empty) is a case of its own; the whole object is not one
            label = f"truncate/{short}/{i}"
            ds = ct(label, seed=i)
            data = encoded(ds, ts)
            layout = elements(data, ts)
            cut = layout[i].start
            sop_end = next(el.end for el in layout if el.tag == SOP_INSTANCE)
            cases.append(
                _case(
                    f"{label} before ({layout[i].tag >> 16:04X},{layout[i].tag & 0xFFFF:04X})",
                    "truncated",
                    data[:cut],
                    sop_uid=ds.SOPInstanceUID,
                    transfer_syntax=ts,
                    # without its SOP UIDs a data set cannot be taken; at a later boundary it is
                    # a shorter valid-looking object: failed, or skipped once Pixel Data is gone
                    statuses=frozenset({CANNOT_UNDERSTAND}) if cut < sop_end else ACK_OR_REFUSE,
                    finals=NOT_EMBEDDED,
                )
            )
    label = "truncate/empty data set"
    cases.append(
        _case(
            label,
            "truncated",
            b"",
            sop_uid=uid(label),
            statuses=frozenset({CANNOT_UNDERSTAND}),
            alone=True,
        )
    )
    evrle, ivrle, evrbe = ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian

    def half(el: Element) -> int:
        return el.value_start + el.length // 2

    mid = [
        ("sop-uid-value", SOP_INSTANCE, lambda el: el.value_start + 5, evrle),
        ("patient-name-tag", PATIENT_NAME_TAG, lambda el: el.start + 2, evrle),
        ("patient-name-value", PATIENT_NAME_TAG, lambda el: el.value_start + 4, evrle),
        ("study-uid-value", STUDY_UID, lambda el: el.value_start + 7, evrle),
        ("rows-value", ROWS_TAG, lambda el: el.value_start + 1, evrle),
        ("pixel-header", PIXEL_DATA, lambda el: el.start + 6, evrle),
        ("pixel-half", PIXEL_DATA, half, evrle),
        ("pixel-minus-1", PIXEL_DATA, lambda el: el.end - 1, evrle),
        ("pixel-minus-2", PIXEL_DATA, lambda el: el.end - 2, evrle),
        ("pixel-half", PIXEL_DATA, half, ivrle),
        ("pixel-half", PIXEL_DATA, half, evrbe),
    ]
    for name, tag, where, ts in mid:
        label = f"truncate-mid/{UID(ts).name}/{name}"
        ds = ct(label)
        data = encoded(ds, ts)
        cut = where(element(data, tag, ts))
        cases.append(
            _case(
                label,
                "truncated",
                data[:cut],
                sop_uid=ds.SOPInstanceUID,
                transfer_syntax=ts,
                statuses=frozenset({CANNOT_UNDERSTAND}) if tag == SOP_INSTANCE else ACK_OR_REFUSE,
                finals=FAILED,
            )
        )
    return cases


def wrong_lengths() -> list[Case]:
    cases = []

    def base(label: str, ts: str = ExplicitVRLittleEndian) -> tuple[pydicom.Dataset, bytes]:
        ds = ct(label)
        return ds, encoded(ds, ts)

    lies = [  # (label, name, tag, claimed length, transfer syntax)
        (
            "overrun-end-short",
            "overrun-end (SliceThickness claims 0xFFFE)",
            SLICE_THICKNESS,
            0xFFFE,
            ExplicitVRLittleEndian,
        ),
        (
            "overrun-end-pixels",
            "overrun-end (Pixel Data claims 0xFFFFFFF0)",
            PIXEL_DATA,
            0xFFFFFFF0,
            ExplicitVRLittleEndian,
        ),
        (
            "overrun-end-implicit",
            "overrun-end (implicit VR, Study UID claims 0x7FFFFFFF)",
            STUDY_UID,
            0x7FFFFFFF,
            ImplicitVRLittleEndian,
        ),
        (
            "rows-4-bytes",
            "Rows claims 4 bytes (misaligns the rest)",
            ROWS_TAG,
            4,
            ExplicitVRLittleEndian,
        ),
        (
            "undefined-on-patient-name",
            "undefined length on Patient's Name (implicit VR)",
            PATIENT_NAME_TAG,
            0xFFFFFFFF,
            ImplicitVRLittleEndian,
        ),
    ]
    for label, name, tag, length, ts in lies:
        ds, data = base(f"length/{label}", ts)
        cases.append(
            _case(
                f"length/{name}",
                "length",
                set_length(data, tag, length, ts),
                sop_uid=ds.SOPInstanceUID,
                transfer_syntax=ts,
            )
        )
    # The SOP Instance UID's length swallows everything up to the end of the patient module:
    # the data set's UID value then holds the accession number, the patient's name, ID, birth date.
    ds, data = base("length/sop-uid-swallows-patient")
    sop = element(data, SOP_INSTANCE)
    swallowed = set_length(data, SOP_INSTANCE, _last_of_group(data, 0x0010).end - sop.value_start)
    cases.append(
        _case(
            "length/SOP Instance UID swallows the patient module",
            "length",
            swallowed,
            sop_uid=ds.SOPInstanceUID,
            statuses=frozenset({CANNOT_UNDERSTAND}),
        )
    )
    # ... and a sender that puts that same value in the command: PHI in the Affected SOP UID.
    ds, data = base("length/sop-uid-swallows-patient-in-command")
    sop = element(data, SOP_INSTANCE)
    end = _last_of_group(data, 0x0010).end
    swallowed = set_length(data, SOP_INSTANCE, end - sop.value_start)
    cases.append(
        _case(
            "length/swallowed patient module in the command's SOP Instance UID too",
            "length",
            swallowed,
            sop_uid=swallowed[sop.value_start : end].decode("latin-1"),
            statuses=frozenset({CANNOT_UNDERSTAND}),
        )
    )
    # Modality's length swallows the rest of group 0008 and the patient module; UIDs intact.
    ds, data = base("length/modality-swallows-patient")
    modality = element(data, MODALITY)
    cases.append(
        _case(
            "length/Modality swallows the patient module",
            "length",
            set_length(data, MODALITY, _last_of_group(data, 0x0010).end - modality.value_start),
            sop_uid=ds.SOPInstanceUID,
            statuses=frozenset({SUCCESS, CANNOT_UNDERSTAND}),
            finals=ANY_FINAL,
        )
    )
    return cases


def huge_dimensions() -> list[Case]:
    cases = []
    for name, rows, frames in (
        ("65535x65535", 65535, None),
        ("100000 frames", None, 100000),
        ("65535x65535 x 100000 frames", 65535, 100000),
        ("0x0", 0, None),
    ):
        label = f"dims/{name}"
        ds = multiframe(label) if frames else ct(label)
        data = encoded(ds)
        if rows is not None:
            for tag in (ROWS_TAG, COLUMNS_TAG):
                data = replace_value(data, tag, struct.pack("<H", rows))
        if frames:
            data = replace_value(data, NUMBER_OF_FRAMES, str(frames).encode())
        data = replace_value(data, PIXEL_DATA, bytes(range(16)))  # tiny, whatever was declared
        cases.append(
            _case(
                label,
                "dimensions",
                data,
                sop_uid=ds.SOPInstanceUID,
                sop_class=ds.SOPClassUID,
                abstract_syntax=ds.SOPClassUID,
            )
        )
    return cases


def pixel_lengths() -> list[Case]:
    expected = ROWS * COLUMNS * 2
    row = COLUMNS * 2
    cases = []
    for name, size, finals in (
        ("double", 2 * expected, FAILED),
        ("half", expected // 2, FAILED),
        # less than a frame of trailing bytes: padding real files carry, may be ignored
        ("one row more", expected + row, frozenset({"failed", "embedded"})),
        ("one row less", expected - row, FAILED),
        ("empty", 0, FAILED),
    ):
        label = f"pixels/{name}"
        ds = ct(label)
        data = replace_value(encoded(ds), PIXEL_DATA, bytes(size))
        cases.append(_case(label, "pixel-length", data, sop_uid=ds.SOPInstanceUID, finals=finals))
    return cases


def bad_frames() -> list[Case]:
    cases = []
    for value in (b"-1", b"-100000", b"0", b"abc"):
        label = f"frames/{value.decode()}"
        ds = multiframe(label)
        data = replace_value(encoded(ds), NUMBER_OF_FRAMES, value)
        cases.append(
            _case(
                label,
                "frames",
                data,
                sop_uid=ds.SOPInstanceUID,
                sop_class=UltrasoundMultiFrameImageStorage,
                abstract_syntax=UltrasoundMultiFrameImageStorage,
            )
        )
    return cases


def transfer_syntaxes() -> list[Case]:
    cases = []
    for label, ts in (
        ("tsyntax/unknown", UNKNOWN_TS),
        ("tsyntax/retired JPEG Extended 3&5", RETIRED_TS),
    ):
        ds = ct(label)
        cases.append(
            _case(
                label,
                "transfer-syntax",
                encoded(ds),
                sop_uid=ds.SOPInstanceUID,
                transfer_syntax=ts,
                statuses=frozenset({CONTEXT_REJECTED}),
            )
        )
    mismatched = (
        ("implicit bytes in an explicit context", ImplicitVRLittleEndian, ExplicitVRLittleEndian),
        ("explicit bytes in an implicit context", ExplicitVRLittleEndian, ImplicitVRLittleEndian),
        (
            "big endian bytes in a little endian context",
            ExplicitVRBigEndian,
            ExplicitVRLittleEndian,
        ),
    )
    for name, actual, context in mismatched:
        label = f"tsyntax/{name}"
        ds = ct(label)
        cases.append(
            _case(
                label,
                "transfer-syntax",
                encoded(ds, actual),
                sop_uid=ds.SOPInstanceUID,
                transfer_syntax=context,
                finals=ANY_FINAL,  # a lenient reader may well make sense of it
            )
        )
    ds = ct("tsyntax/plain bytes in a deflated context")
    cases.append(
        _case(
            "tsyntax/plain bytes in a deflated context",
            "transfer-syntax",
            encoded(ds),
            sop_uid=ds.SOPInstanceUID,
            transfer_syntax=DeflatedExplicitVRLittleEndian,
        )
    )
    ds = ct("tsyntax/deflated stream cut in half")
    stream = encoded(ds, DeflatedExplicitVRLittleEndian)
    cases.append(
        _case(
            "tsyntax/deflated stream cut in half",
            "transfer-syntax",
            stream[: len(stream) // 2],
            sop_uid=ds.SOPInstanceUID,
            transfer_syntax=DeflatedExplicitVRLittleEndian,
        )
    )
    ds = ct("tsyntax/native pixels in a JPEG Baseline context")
    cases.append(
        _case(
            "tsyntax/native pixels in a JPEG Baseline context",
            "transfer-syntax",
            encoded(ds),
            sop_uid=ds.SOPInstanceUID,
            transfer_syntax=JPEGBaseline8Bit,
        )
    )
    ds = ct("tsyntax/encapsulated garbage in a native context")
    data = encoded(ds)
    pixel = element(data, PIXEL_DATA)
    fragments = (
        struct.pack("<HHL", 0xFFFE, 0xE000, 0)  # empty basic offset table
        + struct.pack("<HHL", 0xFFFE, 0xE000, 8)
        + b"\xff\xd8\xff\xe0garb"[:8]
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )
    header = data[pixel.start : pixel.length_at] + struct.pack("<L", 0xFFFFFFFF)
    cases.append(
        _case(
            "tsyntax/encapsulated garbage in a native context",
            "transfer-syntax",
            data[: pixel.start] + header + fragments,
            sop_uid=ds.SOPInstanceUID,
        )
    )
    ds = ct("tsyntax/valid deflated image (control)")
    cases.append(
        _case(
            "tsyntax/valid deflated image (control)",
            "control",
            encoded(ds, DeflatedExplicitVRLittleEndian),
            sop_uid=ds.SOPInstanceUID,
            transfer_syntax=DeflatedExplicitVRLittleEndian,
            statuses=frozenset({SUCCESS}),
            finals=EMBEDDED,
        )
    )
    return cases


#: Command SOP Instance UIDs no daemon may use as a name: 0xC000, nothing written.
UNSAFE_INSTANCE_UIDS = {
    "over 64 characters": "1.2.826.0.1.3680043.2.1143." + "1234567890" * 5,
    "slash": "1.2.3/4.5",
    "path traversal": "../../../hostile-escape-instance",  # spool/<shard>/../../.. = tmp dir
    # pynetdicom hands the handler only the first value: the data set carries just that one,
    # so the instance is stored under it (see command_uids)
    "backslash (multi-valued)": "{uid}\\4.5.6",
    "newline": "1.2.3\n4.5",
    "carriage return": "1.2.3\r4",
    "escape sequence": "1.2.\x1b[2J3",
    "tab": "1.2.3\t4",
    "NUL inside": "1.2\x003.4",
    "DEL": "1.2.3\x7f",
    "non-ASCII": "1.2.3.\xe9",
    "non-breaking space": "1.2.3\xa04",
    "empty": "",
}
#: Command SOP Class UIDs a daemon must not use either.
UNSAFE_CLASS_UIDS = {
    "over 64 characters": "1.2.840.10008.5.1.4.1.1.2." + "9" * 50,
    "slash": "1.2.840.10008.5.1.4.1.1/2",
    "control character": "1.2.840.10008.5.1.4.1.1.2\x07",
    "empty": "",
}


def command_uids() -> list[Case]:
    """Unsafe command UIDs; the data set's own UID is the same hostile value where it fits."""
    cases = []
    for name, bad in UNSAFE_INSTANCE_UIDS.items():
        label = f"cmd-uid/instance/{name}"
        ds = ct(label)
        data = encoded(ds)
        bad = bad.format(uid=ds.SOPInstanceUID)
        if bad:
            data = with_uid(data, SOP_INSTANCE, bad.split("\\")[0])
        statuses = {CANNOT_UNDERSTAND} if bad else {CANNOT_UNDERSTAND, NO_ANSWER}
        multi = "\\" in bad  # pynetdicom keeps the first value, which is the data set's own
        cases.append(
            _case(
                label,
                "command-uid",
                data,
                sop_uid=bad,
                statuses=frozenset({SUCCESS} if multi else statuses),
                finals=EMBEDDED if multi else FAILED,
                alone=not bad,
            )
        )
    for name, bad in UNSAFE_CLASS_UIDS.items():
        label = f"cmd-uid/class/{name}"
        ds = ct(label)
        cases.append(
            _case(
                label,
                "command-uid",
                encoded(ds),
                sop_uid=ds.SOPInstanceUID,
                sop_class=bad,
                statuses=frozenset({CANNOT_UNDERSTAND, PROTOCOL_ABORT if bad else NO_ANSWER}),
                alone=True,
            )
        )
    return cases


def nonconformant_uids() -> list[Case]:
    """Not PS3.5 UIDs but harmless as names: the daemon takes and embeds them (and counts them)."""
    values = {
        "64 hex characters": hex_uid("instance"),
        "leading zero": "1.2.03.4.5.6",
        "double dot": "1.2..3",
        "trailing dot": "1.2.3.",
    }
    cases = []
    for name, value in values.items():
        label = f"nonconformant/{name}"
        ds = ct(label)
        data = with_uid(encoded(ds), SOP_INSTANCE, value)
        cases.append(
            _case(
                label,
                "nonconformant-uid",
                data,
                sop_uid=value,
                statuses=frozenset({SUCCESS}),
                finals=EMBEDDED,
                nonconformant=True,
            )
        )
    for which, tag in (("study", STUDY_UID), ("series", SERIES_UID)):
        label = f"nonconformant/64-hex {which} UID"
        ds = ct(label)
        data = with_uid(encoded(ds), tag, hex_uid(label))
        cases.append(
            _case(
                label,
                "nonconformant-uid",
                data,
                sop_uid=ds.SOPInstanceUID,
                statuses=frozenset({SUCCESS}),
                finals=EMBEDDED,
            )
        )
    return cases


def dataset_uids() -> list[Case]:
    """The command is fine; the data set's own UIDs are not."""
    cases = []

    def add(name: str, change: object, **kw: object) -> None:
        label = f"ds-uid/{name}"
        ds = ct(label)
        data = change(encoded(ds))  # type: ignore[operator]
        cases.append(_case(label, "dataset-uid", data, sop_uid=ds.SOPInstanceUID, **kw))

    def series(value: str) -> object:
        return lambda data: with_uid(data, SERIES_UID, value)

    def study(value: str) -> object:
        return lambda data: with_uid(data, STUDY_UID, value)

    add("Series UID 1.2.3/../4", series("1.2.3/../4"))
    add("Series UID multi-valued", series("1.2.3\\4.5.6"))
    add("Series UID empty", series(""))
    add("Series UID over 64", series("1.2." + "3" * 70))
    add("Series UID with newline", series("1.2.3\n4"))
    add("Series UID non-ASCII", series("1.2.3\xe9"))
    # Printable, short, no separator: "non-conformant but safe" by the rules, yet it is PHI.
    add("Series UID is the Patient ID", series(PATIENT_ID), finals=ANY_FINAL)
    add("Series UID missing", lambda data: remove(data, SERIES_UID))
    add("Study UID traversal", study("../../../../hostile-escape-study"))
    add("Study UID multi-valued", study("1.2.3\\4.5.6"))
    add("Study UID empty", study(""))
    add("Study UID missing", lambda data: remove(data, STUDY_UID))
    add(
        "Study and Series UID missing",
        lambda data: remove(remove(data, SERIES_UID), STUDY_UID),
    )
    add(
        "SOP Class UID is MR in the data set",
        lambda data: with_uid(data, SOP_CLASS, MRImageStorage),
        statuses=frozenset({SOP_CLASS_MISMATCH}),
    )
    add(
        "SOP Instance UID differs from the command's",
        lambda data: with_uid(data, SOP_INSTANCE, uid("ds-uid/other instance")),
        statuses=frozenset({CANNOT_UNDERSTAND}),
    )
    add(
        "SOP Instance UID missing",
        lambda data: remove(data, SOP_INSTANCE),
        statuses=frozenset({CANNOT_UNDERSTAND}),
    )
    # The command announces MR, the context and the data set say CT.
    label = "ds-uid/command says MR, data set says CT"
    ds = ct(label)
    cases.append(
        _case(
            label,
            "dataset-uid",
            encoded(ds),
            sop_uid=ds.SOPInstanceUID,
            sop_class=MRImageStorage,
            statuses=frozenset({SOP_CLASS_MISMATCH}),
        )
    )
    cases.append(
        _case(
            "ds-uid/not a data set at all",
            "dataset-uid",
            b"\x00garbage" * 64,
            sop_uid=uid("ds-uid/not a data set at all"),
            statuses=frozenset({CANNOT_UNDERSTAND}),
        )
    )
    return cases


#: Deflate bomb: a private OB element of zeros, right after group 0008.
BOMB_INFLATED_BYTES = 2 << 30
_BOMB_BLOCK = 64 << 20


def deflate_bomb() -> Case:
    """A valid CT (Deflated) whose private OB element inflates to 2 GiB: about 2 MB on the wire.

    Built without inflating anything: separately compressed, byte-aligned (full flush) deflate
    segments concatenate into one valid stream, so a 64 MiB block of zeros is compressed once and
    repeated.
    """
    label = "bomb/deflate"
    ds = ct(label)
    plain = encoded(ds)
    after = next(el.start for el in elements(plain) if el.tag >> 16 > 0x0008)
    creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 8) + b"FUZZ 1.0"
    huge_header = struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, BOMB_INFLATED_BYTES)

    def segment(chunk: bytes) -> bytes:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)

    zeros = segment(bytes(_BOMB_BLOCK))
    stream = (
        segment(plain[:after] + creator + huge_header)
        + zeros * (BOMB_INFLATED_BYTES // _BOMB_BLOCK)
        + segment(plain[after:])
        + zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush(zlib.Z_FINISH)
    )
    return _case(
        f"{label} ({BOMB_INFLATED_BYTES >> 30} GiB inflated)",
        "deflate-bomb",
        stream,
        sop_uid=ds.SOPInstanceUID,
        transfer_syntax=DeflatedExplicitVRLittleEndian,
    )


def control(label: str) -> Case:
    """A perfectly valid CT (with the fake patient): must be taken and embedded."""
    ds = ct(label, seed=1)
    return _case(
        label,
        "control",
        encoded(ds),
        sop_uid=ds.SOPInstanceUID,
        statuses=frozenset({SUCCESS}),
        finals=EMBEDDED,
    )


def batch() -> list[Case]:
    """Every hostile C-STORE except the deflate bomb and the simultaneous sends, controls mixed in.

    Each case has its own SOP Instance UID, so no answer comes from the duplicate shortcut.
    """
    return [
        control("control/first"),
        *truncations(),
        *wrong_lengths(),
        *huge_dimensions(),
        *pixel_lengths(),
        *bad_frames(),
        *transfer_syntaxes(),
        *command_uids(),
        *nonconformant_uids(),
        *dataset_uids(),
        control("control/last"),
    ]


def simultaneous() -> Case:
    """The object twelve associations send at once (same SOP Instance UID)."""
    return control("simultaneous")


#: Called AE titles of associations that must be rejected (raw bytes, 16 with padding).
BAD_CALLED_AETS = {
    "another AE": b"NOT_PACS_EMBED",
    "lower case": b"pacs_embed",
    "non-ASCII (latin-1)": "PACS_EMB\xc9D".encode("latin-1"),
    "non-ASCII (UTF-8)": "PACS_EMBÉD".encode(),
    "control character": b"PACS\x1bEMBED",
    "all spaces": b" " * 16,
}


# -- the hostile sender -------------------------------------------------------------------------
@dataclass
class Outcome:
    case: Case
    status: int | None  # None: no answer (association aborted, timeout)
    note: str = ""

    def describe(self) -> str:
        shown = "none" if self.status is None else f"0x{self.status & 0xFFFF:04X}"
        if self.status == CONTEXT_REJECTED:
            shown = "context rejected"
        return f"{self.case.name}: {shown} {self.note}".rstrip()


@contextmanager
def lenient_pynetdicom() -> Iterator[None]:
    """Let this process encode and decode any UID: pynetdicom's validators and pydicom's value
    validation (whose warnings pytest turns into errors) are off, since the daemon echoes ours."""
    saved = dict(_config.VALIDATORS)
    settings = pydicom.config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        _config.VALIDATORS.clear()
        _config.VALIDATORS.update(saved)
        settings.reading_validation_mode, settings.writing_validation_mode = modes


def scu(calling_ae: str = "FUZZER", timeout: float = 10.0) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = 30
    ae.dimse_timeout = timeout
    return ae


def contexts_for(cases: list[Case]) -> list[tuple[str, str]]:
    """One requested presentation context per (abstract syntax, transfer syntax) pair."""
    return sorted({(case.abstract_syntax, case.transfer_syntax) for case in cases})


def raw_store(assoc: Association, context_id: int, case: Case, message_id: int) -> int | None:
    """A C-STORE with the case's command UIDs and data bytes, unchecked and unencoded."""
    request = C_STORE()
    request.MessageID = message_id
    request.Priority = 2
    # The setters would validate; a hostile sender does not.
    request._affected_sop_class_uid = UID(case.sop_class_uid)
    request._affected_sop_instance_uid = UID(case.sop_instance_uid)
    request.DataSet = BytesIO(case.data)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused and assoc.is_established:
        time.sleep(0.0001)
    try:
        if case.data:
            assoc.dimse.send_msg(request, context_id)
        else:  # an empty data set: the command, then one empty, last data fragment
            message = C_STORE_RQ()
            message.primitive_to_message(request)
            for pdata in message.encode_msg(context_id, assoc.dimse.maximum_pdu_size):
                assoc.dul.send_pdu(pdata)
            empty = P_DATA()
            empty.presentation_data_value_list.append((context_id, b"\x02"))
            assoc.dul.send_pdu(empty)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if response is None:
        if assoc.is_established:
            assoc.abort()
        return None
    status = getattr(response, "Status", None)
    return None if status is None else int(status)


def send(
    port: int, cases: list[Case], *, timeout: float = 10.0, give_up_after: int = 3
) -> list[Outcome]:
    """Send ``cases``: in order over as few associations as the daemon allows, except the
    ``alone`` ones, each on an association of its own in parallel (they may never be answered).

    An association the daemon aborts is reopened for the next case. After ``give_up_after``
    cases in a row unanswered for ``timeout`` the rest is not sent: a wedged daemon must not
    hang the test.
    """
    results: dict[int, Outcome] = {}

    def alone(i: int, case: Case) -> None:
        results[i] = _send_in_order(port, [case], timeout)[0]

    threads = [
        threading.Thread(target=alone, args=(i, case), daemon=True)
        for i, case in enumerate(cases)
        if case.alone
    ]
    for thread in threads:
        thread.start()
    in_order = [(i, case) for i, case in enumerate(cases) if not case.alone]
    outcomes = _send_in_order(port, [case for _, case in in_order], timeout, give_up_after)
    results.update({i: outcome for (i, _), outcome in zip(in_order, outcomes, strict=True)})
    for thread in threads:
        thread.join(timeout + 30)
    return [
        results.get(i, Outcome(case, None, "sender thread did not finish"))
        for i, case in enumerate(cases)
    ]


def _send_in_order(
    port: int, cases: list[Case], timeout: float, give_up_after: int = 3
) -> list[Outcome]:
    ae = scu(timeout=timeout)
    for abstract, ts in contexts_for(cases):
        ae.add_requested_context(abstract, ts)
    outcomes: list[Outcome] = []
    assoc: Association | None = None
    stuck = 0
    for message_id, case in enumerate(cases, start=1):
        if stuck >= give_up_after:
            outcomes.append(Outcome(case, None, "not sent: the daemon stopped answering"))
            continue
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title="PACS_EMBED")
            if not assoc.is_established:
                outcomes.append(Outcome(case, None, "association not established"))
                stuck += 1
                assoc = None
                continue
        context = next(
            (
                cx
                for cx in assoc.accepted_contexts
                if cx.abstract_syntax == case.abstract_syntax
                and cx.transfer_syntax
                and cx.transfer_syntax[0] == case.transfer_syntax
            ),
            None,
        )
        if context is None:
            outcomes.append(Outcome(case, CONTEXT_REJECTED))
            continue
        assert context.context_id is not None
        started = time.monotonic()
        try:
            status = raw_store(assoc, context.context_id, case, message_id % 65536)
        except Exception as exc:  # our side failed to encode or send: report, go on
            outcomes.append(Outcome(case, None, f"sender error: {type(exc).__name__}: {exc}"))
            if assoc.is_established:
                assoc.abort()
            continue
        note = ""
        if status is None:
            timed_out = time.monotonic() - started >= 0.9 * timeout
            status = NO_ANSWER if timed_out else PROTOCOL_ABORT
            stuck = stuck + 1 if timed_out else 0
        else:
            stuck = 0
            if not assoc.is_established:
                note = "association gone after it"
        outcomes.append(Outcome(case, status, note))
    if assoc is not None and assoc.is_established:
        assoc.release()
    return outcomes


def send_simultaneously(port: int, case: Case, senders: int = 12) -> list[int | None]:
    """``senders`` associations, opened first, then all storing ``case`` at the same moment."""
    barrier = threading.Barrier(senders)
    statuses: list[int | None] = [None] * senders

    def one(i: int) -> None:
        ae = scu(calling_ae=f"FUZZER{i:02d}", timeout=30.0)
        ae.add_requested_context(case.abstract_syntax, case.transfer_syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS_EMBED")
        try:
            barrier.wait(30)
        except threading.BrokenBarrierError:
            pass
        if not assoc.is_established:
            return
        try:
            cx = assoc.accepted_contexts[0]
            assert cx.context_id is not None
            statuses[i] = raw_store(assoc, cx.context_id, case, 1)
        finally:
            if assoc.is_established:
                assoc.release()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return statuses


def _ae_field(title: bytes) -> bytes:
    return title[:16].ljust(16, b" ")


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_raw(port: int, called: bytes, calling: bytes = b"FUZZER") -> str:
    """A hand-made A-ASSOCIATE-RQ (Verification) with any AE title bytes.

    Returns "rejected (result, source, reason)", "accepted" or what else happened.
    """
    context = _item(
        0x20,
        struct.pack(">BBBB", 1, 0, 0, 0)
        + _item(0x30, b"1.2.840.10008.1.1")
        + _item(0x40, ImplicitVRLittleEndian.encode()),
    )
    user = _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.3.4.5.6.7.8"))
    body = (
        struct.pack(">HH", 1, 0)
        + _ae_field(called)
        + _ae_field(calling)
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + context
        + user
    )
    pdu = struct.pack(">BBL", 0x01, 0, len(body)) + body
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(pdu)
        try:
            head = _recv_exactly(sock, 6)
        except (OSError, EOFError) as exc:
            return f"no answer ({type(exc).__name__})"
        kind, _, length = struct.unpack(">BBL", head)
        rest = _recv_exactly(sock, length)
        if kind == 0x03:
            return f"rejected {tuple(rest[1:4])}"
        if kind == 0x02:
            sock.sendall(struct.pack(">BBLL", 0x07, 0, 4, 0))  # A-ABORT
            return "accepted"
        return f"PDU type 0x{kind:02X}"


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def final_states(connection: redis.Redis, uids: Iterable[str]) -> dict[str, str | None]:
    """Each UID's final state from the ledger: embedded, failed, skipped or None (not final)."""
    uids = list(uids)
    with connection.pipeline() as pipe:
        for uid in uids:
            pipe.sismember(keys.EMBEDDED, uid)
            pipe.hexists(keys.FAILED, uid)
            pipe.hexists(keys.SKIPPED, uid)
        flags = pipe.execute()
    out: dict[str, str | None] = {}
    for i, uid in enumerate(uids):
        embedded, failed, skipped = flags[3 * i : 3 * i + 3]
        out[uid] = (
            "embedded" if embedded else "failed" if failed else "skipped" if skipped else None
        )
    return out
