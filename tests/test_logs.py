"""The PHI filter is the second line of defence: whatever code hands a logger, no PHI reaches it."""

from __future__ import annotations

from pipeline.logs import REDACTED, drop_phi


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
