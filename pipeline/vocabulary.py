"""The vocabulary of the header fields that leave the listener host, and their normal forms.

Modality, Body Part Examined and the view are the only header fields besides UIDs that the embed
workers see (they name cohorts and label prompts). They are free text from the sender's point of
view, and a malformed object can put anything into them — an overrun Modality once carried a
whole patient module into Redis. So each is reduced here to a known term before it travels:
a Modality must be a Code String of at most 16 characters, a body part must normalise to a
term of PS3.16 CID 4031 (or a site alias), and a view to a projection of :data:`VIEWS`; else it is
``UNKNOWN``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: What an empty or unreadable field becomes: images without a body part are peers of each
#: other (a cohort of their own), never of an arbitrary other cohort.
UNKNOWN = "UNKNOWN"

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

#: View spellings -> one term per projection. Keys as :func:`_token` makes them: ViewPosition
#: (0018,5101) defined terms and the Code Meanings of PS3.16 CID 4010 / 4014 (View Code Sequence).
VIEW_ALIASES: Mapping[str, str] = {
    "LATERAL": "LAT",
    "LL": "LAT",
    "RL": "LAT",
    "LLD": "LAT",
    "RLD": "LAT",
    "LEFT_LATERAL": "LAT",
    "RIGHT_LATERAL": "LAT",
    "LEFT_RIGHT_LATERAL": "LAT",
    "POSTERO_ANTERIOR": "PA",
    "POSTEROANTERIOR": "PA",
    "ANTERO_POSTERIOR": "AP",
    "ANTEROPOSTERIOR": "AP",
    "CRANIO_CAUDAL": "CC",
    "MEDIO_LATERAL_OBLIQUE": "MLO",
    "MEDIO_LATERAL": "ML",
    "MEDIAL_LATERAL": "ML",
    "LATERO_MEDIAL": "LM",
    "LATERAL_MEDIAL": "LM",
}

#: View Code Sequence code values (SNOMED CT, and the SNOMED RT codes older objects carry) of the
#: common projections (PS3.16 CID 4010 DX View, CID 4014 Mammography View).
VIEW_CODES: Mapping[str, str] = {
    "272479007": "PA",
    "R-10214": "PA",
    "399348003": "AP",
    "R-10206": "AP",
    "399173006": "LAT",
    "R-10236": "LAT",
    "399198007": "LAT",
    "R-10232": "LAT",
    "399162004": "CC",
    "R-10242": "CC",
    "399368009": "MLO",
    "R-10226": "MLO",
    "399260004": "ML",
    "R-10224": "ML",
    "399352003": "LM",
    "R-10228": "LM",
}

#: The view terms that travel (anything else is ``UNKNOWN``): the projections above plus the
#: oblique ViewPosition terms.
VIEWS = frozenset(VIEW_ALIASES.values()) | {"RLO", "LLO"}

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


#: Body Part Examined defined terms (PS3.16 Annex L / CID 4031), normalised with :func:`_token`.
BODY_PARTS = frozenset(
    """
    ABDOMEN ABDOMENPELVIS ACJOINT ADRENAL AMNIOTICFLUID ANKLE ANUS AORTA AORTICARCH APPENDIX ARM
    AXILLA BACK BILEDUCT BLADDER BRAIN BREAST BRONCHUS BUTTOCK CALCANEUS CALF CAROTID CEREBELLUM
    CERVIX CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA
    CORONARYARTERY CSPINE CTSPINE DUODENUM EAR ELBOW ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR
    FINGER FOOT GALLBLADDER HAND HEAD HEADNECK HEART HIP HUMERUS IAC ILEUM ILIUM JAW JEJUNUM
    KIDNEY KNEE LARYNX LEG LIVER LSPINE LSSPINE LUNG MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST
    NECKCHESTABDOMEN NECKCHESTABDPELV NOSE ORBIT OVARY PANCREAS PAROTID PATELLA PELVIS PENIS
    PHARYNX PROSTATE RADIUS RECTUM RIB SACRUM SCAPULA SCROTUM SELLA SHOULDER SKULL SPINE SPLEEN
    SSPINE STERNUM STOMACH SUBMANDIBULAR TESTIS THIGH THUMB THYMUS THYROID TIBIA TLSPINE TMJ
    TOE TONGUE TRACHEA TSPINE ULNA URETER URETHRA UTERUS VAGINA VULVA WHOLEBODY WRIST ZYGOMA
    """.split()
) | frozenset(BODY_PART_ALIASES.values())

#: Modalities whose objects are images to embed (PS3.3 C.7.3.1.1.1 defined terms). Anything
#: else — SEG, RTDOSE, RTSTRUCT, SR, KO, PR, a missing or malformed Modality — ends ``skipped``.
DEFAULT_EMBED_MODALITIES = (
    *("CR", "CT", "DG", "DX", "ES", "GM", "IO", "MG", "MR", "NM", "OP", "OT", "PT", "PX"),
    *("RF", "RG", "SC", "SM", "US", "XA", "XC"),
)

#: SOP classes never embedded even under an embeddable Modality: they carry pixel data that is
#: not a picture of the patient (a Parametric Map says Modality MR, a SEG is a 1-bit mask).
DEFAULT_SKIP_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map Storage
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.5",  # Surface Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose Storage
)

#: A Modality value as PS3.5 allows it: a CS of upper-case letters, digits, space, underscore.
_CODE_STRING = re.compile(r"^[A-Z0-9_ ]{1,16}$")


def modality_code(value: object) -> str:
    """The Modality if it is a valid Code String, else ``""`` (never the raw text)."""
    if not isinstance(value, str):
        return ""
    text = value.strip()
    return text if _CODE_STRING.match(text) else ""


def body_part_term(value: object, extra: Mapping[str, str] | None = None) -> str:
    """Body Part Examined as a known term (``Thorax PA`` -> ``CHEST``), else ``UNKNOWN``."""
    if not isinstance(value, str) or len(value) > 64:
        return UNKNOWN
    term = normalise_body_part(value, extra)
    known = BODY_PARTS | {_token(v) for v in (extra or {}).values()}
    return term if term in known else UNKNOWN


def view_term(value: object) -> str:
    """A view as a term of :data:`VIEWS`, else ``UNKNOWN`` (never the raw text).

    ``value`` is a ViewPosition, or a View Code Sequence item's Code Meaning or Code Value:
    ``Lateral``, ``LL`` -> ``LAT``; ``postero-anterior`` -> ``PA``; ``399348003`` -> ``AP``.
    """
    if not isinstance(value, str) or len(value) > 64:
        return UNKNOWN
    if value.strip() in VIEW_CODES:
        return VIEW_CODES[value.strip()]
    term = normalise_view(value)
    return term if term in VIEWS else UNKNOWN
