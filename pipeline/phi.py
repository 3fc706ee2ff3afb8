"""Patient data, named once: which elements hold it, and whether a UID carries any of it.

pacs-embed keeps UIDs and counts, never patient data. A UID that breaks the UI grammar is still
accepted when it is safe (real archives hold such UIDs), but a non-conformant UID can be
anything a sender typed — including the patient's ID. Such a UID would put patient data into
file names, Redis keys and logs, so a non-conformant UID that contains a value of the object's
own patient elements is treated as unsafe. (A conformant UID is digits and dots: a numeric
patient ID may occur in one by chance, so those are not checked.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: The data set keywords whose values identify the patient or the visit.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "OtherPatientIDs",
    "IssuerOfPatientID",
    "PatientAddress",
    "PatientTelephoneNumbers",
)

#: Values shorter than this are too common to treat as identifying (e.g. "M", "1").
MIN_LENGTH = 4


def phi_values(values: Iterable[object]) -> set[str]:
    """The comparable pieces of the patient elements' values (a PN split at its ``^``)."""
    out: set[str] = set()
    for value in values:
        if value is None:
            continue
        items: list[object] = [value]
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            items = list(value)
        for item in items:
            text = str(item).strip().upper()
            out.update(p for p in [text, *text.split("^")] if len(p.strip()) >= MIN_LENGTH)
    return out


def carries_phi(uid: str, values: set[str]) -> bool:
    """True when ``uid`` contains one of the patient values (case-insensitive)."""
    upper = uid.upper()
    return any(value in upper for value in values)
