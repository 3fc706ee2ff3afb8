"""The header fields a conversion copies out, checked before they leave the listener host.

Only UIDs, SOP Class, Modality and Body Part Examined travel on (to Redis and the embed workers),
and each is checked here against what its VR allows: an identity that cannot be handled safely
quarantines the object, a field that is merely malformed becomes "unknown". No message quotes a
value, because any of them may be an overrun element carrying patient data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pipeline.convert.options import ConvertOptions
from pipeline.errors import ConversionError, NotEmbeddedError
from pipeline.phi import PHI_KEYWORDS, carries_phi, phi_values
from pipeline.uids import is_valid_uid, unsafe_reason
from pipeline.vocabulary import body_part_term, modality_code


@dataclass(frozen=True)
class Identity:
    """Who an object is and what it shows, in the few non-PHI fields the workers may see."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str  # a valid Code String, or ""
    body_part: str  # a CID 4031 term or site alias target, or UNKNOWN


def _raw(ds: Dataset, keyword: str) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's value warnings quote the value
        try:
            return ds.get(keyword)
        except Exception:  # a value pydicom cannot even convert: treat as malformed
            return MultiValue(str, [])


def _uid(ds: Dataset, keyword: str, name: str, patient: set[str]) -> str:
    value = _raw(ds, keyword)
    if isinstance(value, MultiValue):
        raise ConversionError(f"{name} is multi-valued or malformed")
    text = str(value or "").rstrip("\0 ")
    why = unsafe_reason(text)
    if why:
        raise ConversionError(f"{name} is {why}")
    if not is_valid_uid(text) and carries_phi(text, patient):
        raise ConversionError(f"{name} holds patient data")
    return text


def identity_of(ds: Dataset, options: ConvertOptions) -> Identity:
    """The object's identity; ConversionError when a UID it is filed under cannot be handled."""
    modality = _raw(ds, "Modality")
    body_part = _raw(ds, "BodyPartExamined")
    patient = phi_values(_raw(ds, keyword) for keyword in PHI_KEYWORDS)
    return Identity(
        study_instance_uid=_uid(ds, "StudyInstanceUID", "Study Instance UID", patient),
        series_instance_uid=_uid(ds, "SeriesInstanceUID", "Series Instance UID", patient),
        sop_class_uid=_uid(ds, "SOPClassUID", "SOP Class UID", patient),
        modality=modality_code(modality),
        body_part=body_part_term(body_part, dict(options.body_part_aliases)),
    )


def check_embeddable(identity: Identity, options: ConvertOptions) -> None:
    """Raise NotEmbeddedError for what is not an image to embed (by Modality, by SOP Class)."""
    if identity.sop_class_uid in options.skip_sop_classes:
        raise NotEmbeddedError(
            f"not an image to embed: SOP Class {identity.sop_class_uid} (convert.skip_sop_classes)"
        )
    if not identity.modality:
        raise NotEmbeddedError("not an image to embed: Modality missing or not a valid code")
    if identity.modality not in options.embed_modalities:
        raise NotEmbeddedError(
            f"not an image to embed: Modality {identity.modality} (convert.embed_modalities)"
        )
