"""The DICOM objects pacs-embed sends back to the PACS, built by pure functions with highdicom.

Per study version: one Comprehensive SR, a TID 1500 Measurement Report of every image verdict
and of the series and study verdicts (:func:`build_report`, ``sr.py``), and, only when an image
is flagged, one Key Object Selection document titled "Quality Issue" listing the flagged images
(:func:`build_kos`, ``kos.py``). Both are filed in the source study (patient and study modules
copied from a source instance), each in its own series, and named by UIDs derived from (study,
version, kind) (``identity.py``) so that a resend is the same instance. Codes: ``codes.py``.

Builders only: no I/O, no logging, no clock (``now`` is an argument). Sending them, and deciding
when a study version is due, is the caller's business. A leaf below pipeline/verdicts,
pipeline/records and pipeline/uids.
"""

from pipeline.results.identity import Algorithm, Reference, ResultIdentity
from pipeline.results.kos import build_kos, is_flagged
from pipeline.results.sr import build_report

__all__ = [
    "Algorithm",
    "Reference",
    "ResultIdentity",
    "build_kos",
    "build_report",
    "is_flagged",
]
