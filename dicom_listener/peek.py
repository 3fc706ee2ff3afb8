"""The two UIDs the C-STORE handler checks, read from the first bytes of a received data set.

The handler must answer quickly and with bounded memory whatever arrives, so it never parses a
whole data set: elements are read in tag order and reading stops after SOP Instance UID
(0008,0018) — or, when that UID is non-conformant and must be checked for patient data, after
the patient module (group 0010). A Deflated data set is inflated only as far as
:data:`INFLATE_LIMIT` bytes: a 1 MB deflate bomb that would inflate to gigabytes costs the
listener 64 KiB (conversion, in its own process, applies the configured cap to the rest).
"""

from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from pipeline.phi import PHI_KEYWORDS

#: Inflated bytes the handler looks at; group 0008 comes first in every data set.
INFLATE_LIMIT = 1 << 16

_SOP_CLASS, _SOP_INSTANCE, _STUDY_INSTANCE = 0x00080016, 0x00080018, 0x0020000D
#: The last patient element :data:`pipeline.phi.PHI_KEYWORDS` names (Patient's Telephone Numbers).
_PATIENT_END = 0x00102154


class Unreadable(Exception):
    """The data set's start cannot be parsed; the message says why, quoting no value."""


@dataclass(frozen=True)
class SopUids:
    """The data set's own copy of its SOP Class / Instance UID (None when absent), and with
    ``patient=True`` the values of its patient elements (for :func:`pipeline.phi.carries_phi`)."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    patient: tuple[object, ...] = ()


def _text(ds: Dataset, tag: int) -> str | None:
    if tag not in ds:
        return None
    value = ds[tag].value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip("\0 ")
    return None if value is None else str(value)


def peek_sop_uids(
    dataset: bytes | memoryview, transfer_syntax: str, *, patient: bool = False
) -> SopUids:
    """SOP Class and Instance UID of an encoded data set (no File Meta) in ``transfer_syntax``."""
    ds = peek_header(dataset, transfer_syntax, _PATIENT_END if patient else _SOP_INSTANCE)
    values = tuple(ds.get(k) for k in PHI_KEYWORDS) if patient else ()
    return SopUids(_text(ds, _SOP_CLASS), _text(ds, _SOP_INSTANCE), values)


def peek_header(dataset: bytes | memoryview, transfer_syntax: str, last: int) -> Dataset:
    """The elements of an encoded data set (no File Meta) up to tag ``last``, read within the
    module's bounds; Unreadable when its start cannot be parsed."""
    syntax = UID(transfer_syntax)
    data: bytes | memoryview = dataset
    if syntax == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(dataset, INFLATE_LIMIT)
        except zlib.error as exc:
            raise Unreadable("Deflated data set is corrupt") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote values: never log them
            ds = read_dataset(
                io.BytesIO(data),
                is_implicit_VR=syntax.is_implicit_VR,
                is_little_endian=syntax.is_little_endian,
                stop_when=lambda tag, _vr, _length: tag > last,
            )
            for tag in list(ds.keys()):  # every value converted here, its warnings silenced
                _ = ds[tag].value
            return ds
    except Exception as exc:  # any parse failure: the sender gets 0xC000
        raise Unreadable(f"data set cannot be parsed ({type(exc).__name__})") from exc


#: The Part 10 preamble and prefix, and the File Meta group length element that follows them.
_PREFIX, _GROUP_LENGTH = 132, 12


def peek_study(part10: bytes) -> Dataset:
    """The elements up to Study Instance UID of a spooled file (Part 10, as the listener writes
    it: preamble, File Meta with its group length, then the data set), within the same bounds:
    a Deflated data set is inflated only as far as :data:`INFLATE_LIMIT`."""
    if part10[128:_PREFIX] != b"DICM":
        raise Unreadable("not a Part 10 file")
    meta_length = int.from_bytes(part10[_PREFIX + 8 : _PREFIX + _GROUP_LENGTH], "little")
    start = _PREFIX + _GROUP_LENGTH + meta_length
    meta = peek_header(part10[_PREFIX:start], "1.2.840.10008.1.2.1", 0x0002FFFF)
    syntax = str(meta.get("TransferSyntaxUID", ""))
    if not syntax:
        raise Unreadable("File Meta without a transfer syntax")
    return peek_header(memoryview(part10)[start:], syntax, _STUDY_INSTANCE)
