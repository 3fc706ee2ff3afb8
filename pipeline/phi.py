"""Patient data, named once: which elements hold it, and whether a UID carries any of it.

pacs-embed keeps UIDs and counts, never patient data. A UID that breaks the UI grammar is still
accepted when it is safe (real archives hold such UIDs), but a non-conformant UID can be
anything a sender typed — including the patient's ID. Such a UID would put patient data into
file names, Redis keys and logs, so a non-conformant UID that contains a value of the object's
own patient elements is treated as unsafe. (A conformant UID is digits and dots: a numeric
patient ID may occur in one by chance, so those are not checked.)

The comparison ignores case and every character but letters and digits, so a UID spelling the
patient ID without its dashes, or the birth date as 1951-03-17, 17.03.1951 or 03/17/1951, is
caught as well as the value as the data set spells it.
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


def _alnum(text: str) -> str:
    return "".join(c for c in text.upper() if c.isascii() and c.isalnum())


def _date_spellings(value: str) -> list[str]:
    """A DA value (YYYYMMDD) also as DDMMYYYY and MMDDYYYY, the other ways dates are written."""
    if len(value) == 8 and value.isdigit():
        return [value, value[6:] + value[4:6] + value[:4], value[4:6] + value[6:] + value[:4]]
    return [value]


def phi_values(values: Iterable[object]) -> set[str]:
    """The comparable pieces of the patient elements' values (a PN split at its ``^``), each as
    its letters and digits only (a date in its usual spellings)."""
    out: set[str] = set()
    for value in values:
        if value is None:
            continue
        items: list[object] = [value]
        if isinstance(value, Sequence) and not isinstance(value, str | bytes):
            items = list(value)
        for item in items:
            text = str(item).strip()
            for piece in (_alnum(p) for p in [text, *text.split("^")]):
                if len(piece) >= MIN_LENGTH:
                    out.update(_date_spellings(piece))
    return out


def carries_phi(uid: str, values: set[str]) -> bool:
    """True when ``uid`` contains one of the patient values (see the module docstring)."""
    plain = _alnum(uid)
    return any(value in plain for value in values)
