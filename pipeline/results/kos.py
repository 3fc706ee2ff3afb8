"""The Key Object Selection document of one study version: the images a reader should look at.

Made only when something is flagged (an outlier or a label mismatch): an empty selection is not
a valid KOS (TID 2010 needs one reference) and would only add noise to the study. Titled
``(113010, DCM, "Quality Issue")`` (see pipeline/results/codes.py for why not 113000 or 113001),
observed by the pacs-embed device, with a one-line description of what was flagged. Each
flagged image is one reference; the flagged frames of a multi-frame instance are listed in its
Referenced Frame Number (1-based), so a viewer opens the right frames.

The KOS lists exactly the flagged instances in its Current Requested Procedure Evidence Sequence
(the KOS module's "full set of instances referred to"), so highdicom is given only those as
evidence; its patient and study modules are then copied from the same head instance as the SR's,
so both objects file identically even if the study's headers disagree among themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import pydicom
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument

from pipeline.results import codes
from pipeline.results.identity import (
    KOS_KIND,
    KOS_SERIES_NUMBER,
    MANUFACTURER,
    Algorithm,
    ResultIdentity,
    device_observer,
    software_versions,
)
from pipeline.results.sources import (
    evidence,
    finish,
    frame_numbers,
    index_sources,
    patient_study_head,
    source_of,
    verdicts_by_instance,
)
from pipeline.verdicts import InstanceVerdict

SERIES_DESCRIPTION = "pacs-embed quality issues"


def is_flagged(verdict: InstanceVerdict) -> bool:
    """What puts an image in the KOS: flagged as an outlier, or its label check mismatched."""
    return verdict.outlier or verdict.label_mismatch


def build_kos(
    sources: Sequence[pydicom.Dataset],
    verdicts: Sequence[InstanceVerdict],
    *,
    identity: ResultIdentity,
    algorithm: Algorithm,
    now: datetime,
) -> KeyObjectSelectionDocument | None:
    """The KOS of ``identity``'s study version, or None when no image is flagged.

    Same inputs as :func:`pipeline.results.sr.build_report` (and the same ValueErrors); a pure
    function of them.
    """
    by_sop = index_sources(sources, identity.study_instance_uid)
    per_sop = verdicts_by_instance(verdicts, by_sop)
    chosen = {
        sop: [v.image.frame for v in items if is_flagged(v)] for sop, items in per_sop.items()
    }
    selected = {sop: ds for sop, ds in by_sop.items() if chosen.get(sop)}
    if not selected:
        return None
    flagged = [v for items in per_sop.values() for v in items if is_flagged(v)]
    content = KeyObjectSelection(
        document_title=codes.QUALITY_ISSUE,
        referenced_objects=list(selected.values()),
        observer_device_context=device_observer(),
        description=_description(flagged, identity),
    )
    for item in content[0].ContentSequence:
        if item.ValueType == "IMAGE":
            reference = item.ReferencedSOPSequence[0]
            sop = str(reference.ReferencedSOPInstanceUID)
            numbers = frame_numbers(selected[sop], chosen[sop])
            if numbers is not None:
                reference.ReferencedFrameNumber = numbers
    head = patient_study_head(by_sop)
    document = KeyObjectSelectionDocument(
        evidence=evidence(patient_study_head(selected), list(selected.values())),
        content=content,
        series_instance_uid=identity.series_uid(KOS_KIND),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=identity.sop_instance_uid(KOS_KIND),
        instance_number=identity.version,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        series_description=SERIES_DESCRIPTION,
    )
    document.copy_patient_and_study_information(head)
    document.add_new("SoftwareVersions", "LO", software_versions(algorithm))
    finish(document, source_of(head, by_sop), now)
    return document


def _description(flagged: Sequence[InstanceVerdict], identity: ResultIdentity) -> str:
    """What was flagged and where the details are (the SR of the same version)."""
    outliers = sum(v.outlier for v in flagged)
    mismatches = sum(v.label_mismatch for v in flagged)
    return (
        f"pacs-embed flagged {len(flagged)} image(s): {outliers} outlier(s), "
        f"{mismatches} label mismatch(es). Scores and p-values: pacs-embed verdicts SR, "
        f"version {identity.version}."
    )
