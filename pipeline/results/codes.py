"""Every coded concept the result objects use, in one place, standard ones first.

Standard codes where the standard has the concept (PS3.16):

- ``SCT 373066001 Yes`` / ``SCT 373067005 No`` (CID 230): the value of each yes/no evaluation.
- ``SCT 363679005 Imaging procedure`` (CID 100): TID 1500's Procedure Reported; the check runs on
  any imaging procedure, so the generic concept is the honest one.
- ``DCM 126000 Imaging Measurement Report`` (CID 7021): the SR's title (highdicom's default).
- ``DCM 113010 Quality Issue`` (CID 7010): the KOS title. Never ``DCM 113000 Of Interest`` (a
  reader's "look at these") and never ``DCM 113001 Rejected for Quality Reasons``, which IHE IOCM
  archives act on by hiding or deleting the images: a statistical flag must not do that.
- ``UCUM 1 no units``: score and p-value are dimensionless; counts use the UCUM annotation
  ``{images}``.

Private codes (:data:`SCHEME`, declared in each object's Coding Scheme Identification Sequence)
where PS3.16 has no concept: "outlier against a reference set of embeddings" is not
``SCT Abnormal`` (a clinical finding about the patient) nor a DCM image-quality rating (a human
grading scale); the score is our own distance; no DICOM context group holds a p-value; the
labels are configured prompt names (``XR/CHEST``), not a standard terminology; the counts of a
series or study verdict have no standard concept either.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

#: Designator of the private coding scheme (99 prefix: PS3.16 8.2, local schemes).
SCHEME = "99PACSEMBED"

YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
QUALITY_ISSUE = Code("113010", "DCM", "Quality Issue")
NO_UNITS = Code("1", "UCUM", "no units")
IMAGES_UNIT = Code("{images}", "UCUM", "images")

OUTLIER = Code("OUTLIER", SCHEME, "Outlier")
OUTLIER_SCORE = Code("OUTLIER_SCORE", SCHEME, "Outlier score")
P_VALUE = Code("P_VALUE", SCHEME, "Conformal p-value")
PREDICTED_LABEL = Code("PREDICTED_LABEL", SCHEME, "Predicted label")
HEADER_LABEL = Code("HEADER_LABEL", SCHEME, "Header label")
LABEL_MISMATCH = Code("LABEL_MISMATCH", SCHEME, "Label mismatch")
IMAGES = Code("IMAGES", SCHEME, "Images")
SCORED_IMAGES = Code("SCORED_IMAGES", SCHEME, "Scored images")
OUTLIER_IMAGES = Code("OUTLIER_IMAGES", SCHEME, "Outlier images")
LABEL_CHECKED = Code("LABEL_CHECKED", SCHEME, "Label-checked images")
LABEL_MISMATCHES = Code("LABEL_MISMATCHES", SCHEME, "Label mismatches")
MIN_P_VALUE = Code("MIN_P_VALUE", SCHEME, "Minimum p-value")


def scheme_identification() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification item that lets a reader resolve :data:`SCHEME` (a new
    one per object: it is a Dataset, and an object's sequence must not share a mutable item)."""
    return CodingSchemeIdentificationItem(
        designator=SCHEME, name="pacs-embed verdicts", responsible_organization="pacs-embed"
    )


def yes_no(value: bool) -> Code:
    """SCT Yes or No."""
    return YES if value else NO


def label(term: str) -> Code:
    """A configured label (``XR/CHEST``) as a private code whose meaning is the label itself."""
    return Code(term, SCHEME, term)
