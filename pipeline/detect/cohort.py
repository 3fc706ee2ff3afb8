"""Cohort keys: which images are peers, read from the few non-PHI header fields a worker sees.

A cohort is (Modality, normalised BodyPartExamined[, view]), written ``CR/CHEST`` or
``CR/CHEST/PA``. Vendors spell the same body part many ways (``CHEST``, ``Chest``, ``THORAX``,
``Thorax PA``, empty), and an image compared with the wrong peers is flagged for its spelling,
not its content; so the spelling is normalised before it names a cohort.

Keys contain only ``[A-Z0-9_/]``: they are safe inside Redis keys (and inside a Redis Cluster
hash tag ``{...}``) and in file names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: What an empty or unreadable field becomes: images without a body part are peers of each
#: other (a cohort of their own), never of an arbitrary other cohort.
UNKNOWN = "UNKNOWN"

#: The header fields a cohort key can be built from, in key order.
FIELDS = ("modality", "body_part", "view")

#: Common vendor spellings -> the DICOM defined term (PS3.16 CID 4031) used as the cohort name.
#: Keys are already upper-cased with runs of non-alphanumerics replaced by "_".
BODY_PART_ALIASES: Mapping[str, str] = {
    "THORAX": "CHEST",
    "THX": "CHEST",
    "TORAX": "CHEST",
    "TORACE": "CHEST",
    "LUNG": "CHEST",
    "LUNGS": "CHEST",
    "CHEST_PA": "CHEST",
    "CHEST_AP": "CHEST",
    "CHEST_LAT": "CHEST",
    "THORAX_PA": "CHEST",
    "THORAX_AP": "CHEST",
    "PA_CHEST": "CHEST",
    "CXR": "CHEST",
    "BRAIN": "HEAD",
    "SKULL": "HEAD",
    "CRANIUM": "HEAD",
    "SCHAEDEL": "HEAD",
    "ABD": "ABDOMEN",
    "ABDOMEN_PELVIS": "ABDOMENPELVIS",
    "ABD_PELVIS": "ABDOMENPELVIS",
    "C_SPINE": "CSPINE",
    "T_SPINE": "TSPINE",
    "L_SPINE": "LSPINE",
    "CERVICAL_SPINE": "CSPINE",
    "THORACIC_SPINE": "TSPINE",
    "LUMBAR_SPINE": "LSPINE",
    "MAMMA": "BREAST",
}

#: ViewPosition spellings -> one term per projection.
VIEW_ALIASES: Mapping[str, str] = {
    "LATERAL": "LAT",
    "LL": "LAT",
    "RL": "LAT",
    "LLD": "LAT",
    "RLD": "LAT",
    "POSTERO_ANTERIOR": "PA",
    "ANTERO_POSTERIOR": "AP",
}

_NOT_ALNUM = re.compile(r"[^A-Z0-9]+")


def _token(value: str | None) -> str:
    """Upper-cased, runs of anything but A-Z/0-9 collapsed to one ``_``, trimmed."""
    return _NOT_ALNUM.sub("_", str(value or "").strip().upper()).strip("_")


def normalise_modality(value: str | None) -> str:
    """``ct `` -> ``CT``; empty -> ``UNKNOWN``. Modality is a defined term: no aliases."""
    return _token(value).replace("_", "") or UNKNOWN


def normalise_body_part(value: str | None, extra: Mapping[str, str] | None = None) -> str:
    """``Chest``, ``THORAX``, ``chest pa`` -> ``CHEST``; empty -> ``UNKNOWN``.

    ``extra`` (from ``detect.body_part_aliases``) is consulted before the built-in table, so a
    site can fix its own vendors' spellings without a release.
    """
    token = _token(value)
    if not token:
        return UNKNOWN
    for table in (_normalised_keys(extra or {}), BODY_PART_ALIASES):
        if token in table:
            return _token(table[token]) or UNKNOWN
    return token


def normalise_view(value: str | None) -> str:
    """``Lateral``, ``LL`` -> ``LAT``; ``pa`` -> ``PA``; empty -> ``UNKNOWN``."""
    token = _token(value)
    return VIEW_ALIASES.get(token, token) or UNKNOWN


def _normalised_keys(table: Mapping[str, str]) -> dict[str, str]:
    return {_token(key): value for key, value in table.items()}


@dataclass(frozen=True)
class CohortRule:
    """How a header becomes a cohort key: which fields, and the site's extra spellings."""

    fields: Sequence[str] = ("modality", "body_part")
    body_part_aliases: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [name for name in self.fields if name not in FIELDS]
        if not self.fields or unknown or len(set(self.fields)) != len(self.fields):
            raise ValueError(
                f"cohort fields must be distinct names from {FIELDS}, got {self.fields}"
            )

    def key(self, modality: str | None, body_part: str | None, view: str | None = None) -> str:
        """The cohort of one image, e.g. ``CR/CHEST``."""
        parts = {
            "modality": normalise_modality(modality),
            "body_part": normalise_body_part(body_part, self.body_part_aliases),
            "view": normalise_view(view),
        }
        return "/".join(parts[name] for name in self.fields)

    def parse(self, text: str) -> str:
        """A cohort key typed by a person (``cr/Thorax``) in its normal form; ValueError if the
        number of parts does not match the configured fields."""
        parts = [part for part in text.strip().split("/")]
        if len(parts) != len(self.fields):
            raise ValueError(
                f"cohort {text!r} has {len(parts)} part(s); this configuration's cohorts are "
                + "/".join(self.fields)
            )
        values = dict(zip(self.fields, parts, strict=True))
        return self.key(values.get("modality"), values.get("body_part"), values.get("view"))
