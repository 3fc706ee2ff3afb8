"""The source instances' headers as the builders need them: checked, indexed, made safe to copy.

highdicom copies the patient and study modules from the first evidence instance, and reads a few
of them as attributes on the way (``evidence[0].PatientID``...), so a header missing a Type 2
attribute would raise AttributeError, an unusual Patient's Sex would raise ValueError, and a
Patient's Name without a ``^`` would be *quoted in a warning and a log line*: patient data in the
logs. :func:`patient_study_head` therefore hands highdicom a copy of the head instance with those
attributes made harmless (the name blanked), and :func:`finish` puts the name back into the
finished object verbatim. The caller's datasets are never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

import pydicom

# Private to highdicom but the only way to know which SOP classes its module copy understands;
# pyproject pins highdicom's minor version for this and for its pre-1.0 API.
from highdicom._standard_utils import get_sop_class_iod_map
from pydicom.tag import Tag
from pydicom.valuerep import DA, DT, TM

from pipeline.uids import loggable
from pipeline.verdicts import InstanceVerdict

#: Type 2 patient/study attributes highdicom reads as attributes (absent -> AttributeError).
_REQUIRED_EMPTY = (
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
#: Dates/times highdicom parses (an invalid value -> ValueError): blanked when unparseable.
_PARSED = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}
_PATIENT_SEXES = ("M", "F", "O", "")
_PATIENT_NAME = Tag("PatientName")
_PIXEL_DATA = Tag("PixelData")


def index_sources(sources: Iterable[pydicom.Dataset], study_uid: str) -> dict[str, pydicom.Dataset]:
    """The sources by SOP Instance UID, in the given order, a repeated instance once; every
    one must belong to ``study_uid`` (the result objects are filed in that study)."""
    by_sop: dict[str, pydicom.Dataset] = {}
    for ds in sources:
        if str(ds.StudyInstanceUID) != study_uid:
            raise ValueError(
                f"source {loggable(str(ds.SOPInstanceUID))} belongs to another study than "
                f"{loggable(study_uid)}"
            )
        by_sop.setdefault(str(ds.SOPInstanceUID), ds)
    if not by_sop:
        raise ValueError("no source instances: a result object needs at least one")
    return by_sop


def verdicts_by_instance(
    verdicts: Iterable[InstanceVerdict], by_sop: Mapping[str, pydicom.Dataset]
) -> dict[str, list[InstanceVerdict]]:
    """The verdicts per SOP Instance UID, frames in order; each must have its source header
    (it is what the reference is made from) and each image (instance, frame) one verdict."""
    out: dict[str, list[InstanceVerdict]] = {}
    for v in verdicts:
        sop = v.image.sop_instance_uid
        if sop not in by_sop:
            raise ValueError(f"verdict for {loggable(sop)}, which is not among the sources")
        out.setdefault(sop, []).append(v)
    for sop, items in out.items():
        items.sort(key=lambda v: v.image.frame)
        frames = [v.image.frame for v in items]
        if len(set(frames)) != len(frames):
            raise ValueError(f"more than one verdict for one frame of {loggable(sop)}")
    return out


def number_of_frames(ds: pydicom.Dataset) -> int:
    """Number of Frames, 1 when absent or unreadable."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def frame_numbers(ds: pydicom.Dataset, frames: Iterable[int]) -> list[int] | None:
    """DICOM Referenced Frame Numbers (1-based) for our 0-based ``frames`` of ``ds``; None for a
    single-frame instance, which a reference names without a frame."""
    wanted = sorted(set(frames))
    count = number_of_frames(ds)
    if any(not 0 <= f < count for f in wanted):
        raise ValueError(
            f"frame out of range for {loggable(str(ds.SOPInstanceUID))} ({count} frame(s))"
        )
    return [f + 1 for f in wanted] if count > 1 else None


def patient_study_head(by_sop: Mapping[str, pydicom.Dataset]) -> pydicom.Dataset:
    """A copy of the first source highdicom can copy the patient and study from (a standard SOP
    class), made harmless as the module docstring says; pixel data left out."""
    known = get_sop_class_iod_map()
    source = next((ds for ds in by_sop.values() if str(ds.SOPClassUID) in known), None)
    if source is None:
        raise ValueError("no source of a standard SOP class to copy the patient and study from")
    head = pydicom.Dataset()
    for element in source:
        if element.tag != _PIXEL_DATA:
            head.add(copy.deepcopy(element))
    head.PatientName = ""
    for keyword in _REQUIRED_EMPTY:
        if keyword not in head:
            setattr(head, keyword, None)
    if head.PatientSex not in _PATIENT_SEXES:
        head.PatientSex = ""
    for keyword, parse in _PARSED.items():
        try:
            parse(head[keyword].value)
        except (TypeError, ValueError):
            setattr(head, keyword, "")
    return head


def source_of(head: pydicom.Dataset, by_sop: Mapping[str, pydicom.Dataset]) -> pydicom.Dataset:
    """The caller's dataset ``head`` was copied from."""
    return by_sop[str(head.SOPInstanceUID)]


def evidence(head: pydicom.Dataset, datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """``datasets`` with ``head`` standing first in place of its source (highdicom takes the
    patient and study from the first evidence item), the others reduced to the four UIDs a
    reference is made of: highdicom copies and searches every evidence item, and a full header
    each made a 200-image report take seconds."""
    sop = str(head.SOPInstanceUID)
    return [head, *(_reference_only(ds) for ds in datasets if str(ds.SOPInstanceUID) != sop)]


_REFERENCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


def _reference_only(ds: pydicom.Dataset) -> pydicom.Dataset:
    slim = pydicom.Dataset()
    for keyword in _REFERENCE_KEYWORDS:
        setattr(slim, keyword, ds[keyword].value)
    return slim


def finish(doc: pydicom.Dataset, source: pydicom.Dataset, now: datetime) -> None:
    """The last touches on a built object: the Patient's Name back from ``source`` verbatim,
    and every date/time highdicom took from the clock set to ``now`` (the builders stay pure:
    the same inputs give the same object)."""
    if _PATIENT_NAME in source:
        doc[_PATIENT_NAME] = copy.deepcopy(source[_PATIENT_NAME])
    doc.InstanceCreationDate = DA(now.date())
    doc.InstanceCreationTime = TM(now.time())
    doc.ContentDate = DA(now.date())
    doc.ContentTime = TM(now.time())
    for item in doc.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(now)
