"""DICOM UIDs as identities: validated before they name a file, a Redis key or a job."""

from __future__ import annotations

import hashlib
import re

# PS3.5 9.1: components of digits separated by dots, no leading zero in a multi-digit component,
# 64 characters at most.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
MAX_UID_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid UID; anything else (None, bytes, padding) is refused."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and bool(_UID.match(value))


def job_id(prefix: str, series_uid: str, sop_uids: list[str]) -> str:
    """An rq job id for a batch: readable series, plus a digest of the exact set of instances.

    rq allows only ``[A-Za-z0-9_-]``, so the dots become dashes. The same set of instances always
    yields the same id, so re-enqueueing a batch after a crash cannot create a second job for it.
    """
    digest = hashlib.sha256("\n".join(sorted(sop_uids)).encode("ascii")).hexdigest()[:16]
    return f"{prefix}-{series_uid.replace('.', '-')}-{digest}"
