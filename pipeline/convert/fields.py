"""The header fields a conversion copies out, checked before they leave the listener host.

Only UIDs, SOP Class, Modality, Body Part Examined and the view (ViewPosition, else the View Code
Sequence) travel on (to Redis and the embed workers), as a :class:`pipeline.records.ImageRecord`,
and each is checked here against what its VR allows: an identity that cannot be handled safely
quarantines the object, a field that is merely malformed becomes "unknown". No message quotes a
value, because any of them may be an overrun element carrying patient data.
"""

from __future__ import annotations

import warnings

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pipeline.convert.options import ConvertOptions
from pipeline.errors import ConversionError, NotEmbeddedError
from pipeline.phi import PHI_KEYWORDS, carries_phi, phi_values
from pipeline.records import ImageRecord
from pipeline.uids import is_valid_uid, unsafe_reason
from pipeline.vocabulary import UNKNOWN, body_part_term, modality_code, view_term


def _raw(ds: Dataset, keyword: str) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's value warnings quote the value
        try:
            return ds.get(keyword)
        except Exception:  # a value pydicom cannot even convert: treat as malformed
            return MultiValue(str, [])


def checked_uid(ds: Dataset, keyword: str, name: str) -> str:
    """The UID under ``keyword``, refused (ConversionError naming ``name``) when it is
    multi-valued, unsafe, or non-conformant and holding the object's own patient data."""
    value = _raw(ds, keyword)
    if isinstance(value, MultiValue):
        raise ConversionError(f"{name} is multi-valued or malformed")
    text = str(value or "").rstrip("\0 ")
    why = unsafe_reason(text)
    if why:
        raise ConversionError(f"{name} is {why}")
    # Only a non-conformant UID can hold text; the patient elements are read only then.
    if not is_valid_uid(text) and carries_phi(text, phi_values(_raw(ds, k) for k in PHI_KEYWORDS)):
        raise ConversionError(f"{name} holds patient data")
    return text


def _sop_instance_uid(ds: Dataset) -> str:
    value = _raw(ds, "SOPInstanceUID")
    if isinstance(value, MultiValue):
        raise ConversionError("SOP Instance UID is multi-valued or malformed")
    text = str(value or "").strip("\0 ")
    if not text:
        raise ConversionError("no SOP Instance UID")
    return text


def view_of(ds: Dataset) -> str:
    """The projection: ViewPosition, else the View Code Sequence's first item (its Code Meaning,
    else its Code Value), as a term of ``pipeline.vocabulary.VIEWS`` or UNKNOWN."""
    term = view_term(_raw(ds, "ViewPosition"))
    if term != UNKNOWN:
        return term
    codes = _raw(ds, "ViewCodeSequence")
    try:
        item = codes[0] if codes else None  # type: ignore[index]
    except Exception:  # not a sequence: malformed
        return UNKNOWN
    if not isinstance(item, Dataset):
        return UNKNOWN
    for keyword in ("CodeMeaning", "CodeValue"):
        term = view_term(_raw(item, keyword))
        if term != UNKNOWN:
            return term
    return UNKNOWN


def record_of(ds: Dataset, options: ConvertOptions) -> ImageRecord:
    """The object's record (frame 0); ConversionError when a UID it is filed under cannot be
    handled."""
    sop_instance_uid = _sop_instance_uid(ds)
    modality = _raw(ds, "Modality")
    body_part = _raw(ds, "BodyPartExamined")
    return ImageRecord(
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=checked_uid(ds, "StudyInstanceUID", "Study Instance UID"),
        series_instance_uid=checked_uid(ds, "SeriesInstanceUID", "Series Instance UID"),
        sop_class_uid=checked_uid(ds, "SOPClassUID", "SOP Class UID"),
        modality=modality_code(modality),
        body_part=body_part_term(body_part, dict(options.body_part_aliases)),
        view=view_of(ds),
    )


def check_embeddable(record: ImageRecord, options: ConvertOptions) -> None:
    """Raise NotEmbeddedError for what is not an image to embed (by Modality, by SOP Class)."""
    if record.sop_class_uid in options.skip_sop_classes:
        raise NotEmbeddedError(
            f"not an image to embed: SOP Class {record.sop_class_uid} (convert.skip_sop_classes)"
        )
    if not record.modality:
        raise NotEmbeddedError("not an image to embed: Modality missing or not a valid code")
    if record.modality not in options.embed_modalities:
        raise NotEmbeddedError(
            f"not an image to embed: Modality {record.modality} (convert.embed_modalities)"
        )
