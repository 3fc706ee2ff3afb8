"""DICOM UIDs as identities: checked before they are handled, hashed before they name anything.

Two questions, kept apart on purpose:

- *Conformant* (PS3.5 9.1): digits and dots, no leading zeros, at most 64 characters. Many real
  archives hold UIDs that break this (hexadecimal ones, leading zeros); the PACS in front of us
  stored them, so refusing them would break its forward job. They are accepted, logged as
  ``uid.nonconformant`` and counted.
- *Safe*: printable ASCII without path separators or backslash (the value separator of a
  multi-valued element), at most 64 characters. Only an unsafe UID is refused (0xC000): nothing
  can be done with it without risk.

Even a safe UID never names a file, a job or anything else as is: :func:`token` turns it into
characters every consumer accepts (rq job ids allow only ``[A-Za-z0-9_-]``), reversibly where
it must be read back (:func:`file_stem` / :func:`from_file_stem`).
"""

from __future__ import annotations

import hashlib
import re

# PS3.5 9.1: components of digits separated by dots, no leading zero in a multi-digit component,
# 64 characters at most.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
MAX_UID_LENGTH = 64

#: Printable ASCII less "/" and "\\" (path separator, value separator). Space is printable but a
#: UI value is padded with NUL, never with spaces: leading/trailing spaces are refused as well.
_SAFE = re.compile(r"^[!-.0-\[\]-~]([ -.0-\[\]-~]*[!-.0-\[\]-~])?$")

#: Marks a spool file stem that is a hex-encoded UID rather than the UID itself.
_HEX_STEM = "x"


def is_valid_uid(value: object) -> bool:
    """True for a conformant UID (PS3.5 9.1); anything else (None, bytes, padding) is False."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and bool(_UID.match(value))


def is_safe_uid(value: object) -> bool:
    """True when ``value`` can be handled: printable ASCII, 1-64 characters, no ``/`` or ``\\``,
    not ``.`` or ``..``."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and value not in (".", "..")
        and bool(_SAFE.match(value))
    )


def unsafe_reason(value: object) -> str | None:
    """Why a UID cannot be handled (without quoting it: it may carry patient data), or None."""
    if not isinstance(value, str) or not value:
        return "missing"
    if len(value) > MAX_UID_LENGTH:
        return f"longer than {MAX_UID_LENGTH} characters ({len(value)})"
    if not is_safe_uid(value):
        return "not printable ASCII, or holds a path or value separator"
    return None


def loggable(uid: str) -> str:
    """``uid`` as a log may show it: a conformant UID as is, anything else as a digest, since a
    refused or unchecked one may hold anything, patient data included."""
    return uid if is_valid_uid(uid) else f"sha256:{digest(uid, 16)}"


def digest(value: str, length: int = 32) -> str:
    """A stable hexadecimal digest of ``value`` (not for security: for names)."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:length]


def token(uid: str) -> str:
    """``uid`` as ``[A-Za-z0-9_-]``: dots become dashes for a conformant UID, anything else is
    hashed (``h`` + digest), so no caller ever builds an identifier from raw header text."""
    if is_valid_uid(uid):
        return uid.replace(".", "-")
    return f"h{digest(uid)}"


def file_stem(uid: str) -> str:
    """A file name stem for a safe UID: the UID itself when conformant, else its hex encoding.

    Reversible (:func:`from_file_stem`), because the spool's file names are how reconciliation
    finds instances again after a crash.
    """
    if is_valid_uid(uid):
        return uid
    return _HEX_STEM + uid.encode("ascii").hex()


def from_file_stem(stem: str) -> str:
    """The UID a :func:`file_stem` was made from."""
    if stem.startswith(_HEX_STEM):
        return bytes.fromhex(stem[len(_HEX_STEM) :]).decode("ascii")
    return stem


def job_id(prefix: str, series_uid: str, image_keys: list[str]) -> str:
    """An rq job id for a batch: the series' :func:`token`, plus a digest of its images' keys
    (``<sop>`` or ``<sop>/<frame>``: frames of one instance may travel in different batches).

    The same set of images always yields the same id, so re-enqueueing a batch after a crash
    cannot create a second job for it.
    """
    return f"{prefix}-{token(series_uid)}-{digest(chr(10).join(sorted(image_keys)), 16)}"


def derived_uid(*parts: str) -> str:
    """A UID that is a pure function of ``parts``: ``2.25.`` + a name-based UUID as a decimal.

    For objects pacs-embed creates and may create again (a result pushed again after a crash):
    the same parts give the same UID, so the receiver recognises the resend instead of storing
    a second copy. PS3.5 B.2 roots UUID-derived UIDs at ``2.25``; the UUID is the first 128 bits
    of SHA-256 over the parts with the RFC 9562 version 8 (custom) and variant bits set, so it is
    a valid UUID, not just a number. Parts are joined with NUL, which no safe UID holds, so
    ("1.2", "3") and ("1", ".23") differ. At most 44 characters, conformant (no leading zero).
    """
    name = "\0".join(("pacs-embed", *parts)).encode("utf-8", "surrogateescape")
    value = int.from_bytes(hashlib.sha256(name).digest()[:16], "big")
    value = (value & ~(0xF << 76)) | (0x8 << 76)  # version 8
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant 10xx (RFC 9562)
    return f"2.25.{value}"
