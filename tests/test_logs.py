"""The PHI filter is the second line of defence: whatever code hands a logger, no PHI reaches it."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator

import pydicom.config
import pytest
import structlog

from pipeline.logs import REDACTED, LibraryMessages, configure, drop_phi, withhold_quoted


def test_phi_keys_are_redacted_and_uids_kept() -> None:
    """Patient name/ID/birth date/accession are replaced; UIDs and counts pass untouched."""
    event = {
        "event": "store.accepted",
        "PatientName": "Doe^Jane",
        "patient_id": "PID-12345",
        "birth_date": "19700101",
        "AccessionNumber": "ACC-0001",
        "sop_instance_uid": "1.2.3.4",
        "images": 3,
    }
    out = drop_phi(None, "info", dict(event))
    assert out["PatientName"] == out["patient_id"] == out["birth_date"] == REDACTED
    assert out["AccessionNumber"] == REDACTED
    assert out["sop_instance_uid"] == "1.2.3.4" and out["images"] == 3


PHI = ("DOE^JANE", "PID-4711", "19230405", "ACC-0815")


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """``configure()`` writing to a buffer for one test; structlog, logging and pydicom as they
    were afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    mode = pydicom.config.settings.reading_validation_mode
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    configure("info", "json")
    yield buffer
    logging.captureWarnings(False)
    root.handlers[:], root.level = handlers, level
    pydicom.config.settings.reading_validation_mode = mode
    structlog.configure(**saved)


def test_library_warnings_are_logged_without_the_values_they_quote(stderr: io.StringIO) -> None:
    """pydicom's validation warning about an overrun UID (patient module swallowed) reaches the
    structured log, once, with the value withheld; nothing raw on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        value = "1.2.3\x00" + "\x10\x00\x10\x00PN".join(PHI)
        warnings.warn(f"Invalid value for VR UI: '{value}'. Please see <...>", stacklevel=1)
        logging.getLogger("pydicom").warning("Expected %r, found %r", "1.2", "DOE^JANE")
    err = stderr.getvalue()
    assert not any(part in err for part in PHI), err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [line["logger"] for line in lines] == ["py.warnings", "pydicom"], err
    assert all(line["level"] == "warning" for line in lines)
    assert "Invalid value for VR UI: '<withheld>'" in lines[0]["event"]


def test_our_own_messages_keep_their_text() -> None:
    """Only library records are rewritten: our events are structured and already PHI-free."""
    record = logging.LogRecord("dicom_listener.handlers", 30, "x", 1, "kept 'as is'", (), None)
    assert LibraryMessages().filter(record) and record.getMessage() == "kept 'as is'"
    record = logging.LogRecord("pynetdicom.utils", 30, "x", 1, "bad '%s'", ("DOE^JANE",), None)
    assert LibraryMessages().filter(record) and record.getMessage() == "bad '<withheld>'"


def test_withhold_quoted_bounds_length() -> None:
    """Whatever a library dumps, at most 200 characters of it survive."""
    assert len(withhold_quoted("x" * 10_000)) == 200
    assert withhold_quoted("b'\\x00PHI' and \"more\"") == "'<withheld>' and '<withheld>'"
