"""Results pushed back, end to end: DCMTK storescu -> `pacs-embed run` -> SR + KOS into a real
Orthanc (C-STORE) and a signed webhook, once per study version; a late instance opens version 2,
whose SR names version 1's as its predecessor.

Orthanc is Debian's, started as a plain local process on loopback ports (tests/orthanc.py). It
holds the study (uploaded through its REST API, as the PACS that forwards it would), and we check
through the same API that our objects were filed in that study. Every object is checked with
dciodvfy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pipeline.sinks.webhook import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify
from tests import factory, orthanc
from tests.daemon import Daemon, storescu, successes
from tests.orthanc import Orthanc
from tests.sinks_peers import HTTPReceiver, Recorded
from tests.test_verdicts_e2e import SIDE, head_slice, reference_file

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed"),
    pytest.mark.skipif(not orthanc.available(), reason="Orthanc not installed"),
]

SECRET = "webhook-test-secret"  # noqa: S105 - a test's own receiver
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


class Webhooks:
    """A receiver that checks every signature and keeps the bodies it accepted."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()

    def answer(self, request: Recorded) -> tuple[int, dict[str, str], bytes]:
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self.lock:
            if not verify(request.body, SECRET.encode(), headers[SIGNATURE_HEADER.lower()]):
                self.bad_signatures += 1
                return 401, {}, b""
            self.keys.append(headers[IDEMPOTENCY_HEADER.lower()])
            self.bodies.append(json.loads(request.body))
        return 204, {}, b""

    def versions(self, study: str) -> list[int]:
        with self.lock:
            return sorted(b["version"] for b in self.bodies if b["study_instance_uid"] == study)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Daemon, Orthanc, Webhooks]]:
    webhooks = Webhooks()
    daemon = Daemon(
        tmp_path / "var",
        tmp_path / "daemon.log",
        QUEUE__LINGER_SECONDS="0.3",
        STUDY__STABLE_SECONDS="2",
    )
    with (
        Orthanc(tmp_path / "orthanc", {"pe": ("PACS_EMBED", daemon.dicom_port)}) as pacs,
        HTTPReceiver(webhooks.answer) as receiver,
    ):
        daemon.env.update(
            {
                "PACS_EMBED_SINKS__DICOM__HOST": "127.0.0.1",
                "PACS_EMBED_SINKS__DICOM__PORT": str(pacs.dicom_port),
                "PACS_EMBED_SINKS__DICOM__AE_TITLE": orthanc.AE_TITLE,
                "PACS_EMBED_SINKS__WEBHOOK__URL": receiver.url,
                "PACS_EMBED_SINKS__WEBHOOK__SECRET": SECRET,
            }
        )
        daemon.start()
        try:
            yield daemon, pacs, webhooks
        finally:
            daemon.stop()


def ours(pacs: Orthanc, study: str, sop_class: str) -> list[pydicom.Dataset]:
    """Our objects of one class in ``study``, as Orthanc stored them."""
    found = pacs.post(
        "/tools/find",
        {"Level": "Instance", "Query": {"StudyInstanceUID": study, "SOPClassUID": sop_class}},
    )
    return [pydicom.dcmread(_file(pacs, oid)) for oid in found]


def _file(pacs: Orthanc, oid: str) -> Any:
    import io
    import urllib.request

    url = f"http://127.0.0.1:{pacs.http_port}/instances/{oid}/file"
    with urllib.request.urlopen(url, timeout=10) as response:
        return io.BytesIO(response.read())


def referenced(sr: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs of the SR's evidence."""
    return {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


def dciodvfy_errors(ds: pydicom.Dataset, path: Path) -> list[str]:
    ds.save_as(path, enforce_file_format=True)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in result.stderr.splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_results_reach_the_pacs_and_the_webhook_once_per_version(
    world: tuple[Daemon, Orthanc, Webhooks], tmp_path: Path
) -> None:
    daemon, pacs, webhooks = world
    imported = daemon.cli("reference", "import", str(reference_file(tmp_path / "ref.npz")))
    assert imported.returncode == 0, imported.stderr
    study, series = factory.new_uid(), factory.new_uid()
    slices = [
        factory.ct_slice(
            study_uid=study,
            series_uid=series,
            instance_number=i,
            rows=SIDE,
            columns=SIDE,
            seed=i,
        )
        for i in range(1, 7)
    ]
    odd = head_slice(study, series)
    for ds in [*slices, odd]:
        ds.PatientName, ds.PatientID = "Push^Test", "PUSH-1"
    files = [factory.write(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate([*slices, odd])]
    for path in files:  # the PACS holds the study
        pacs.upload(path)
    sent = storescu(daemon.dicom_port, files)
    assert successes(sent) == len(files), sent.stdout + sent.stderr
    sops = {str(ds.SOPInstanceUID) for ds in [*slices, odd]}

    daemon.wait_for(lambda: len(ours(pacs, study, SR_CLASS)) == 1, 90, "the SR in Orthanc")
    daemon.wait_for(lambda: webhooks.versions(study) == [1], 30, "the webhook of version 1")
    (sr,) = ours(pacs, study, SR_CLASS)
    assert referenced(sr) == sops
    assert sr.PatientID == "PUSH-1" and sr.StudyInstanceUID == study
    assert sr.SeriesInstanceUID not in {series}
    assert dciodvfy_errors(sr, tmp_path / "sr.dcm") == []
    (kos,) = ours(pacs, study, KOS_CLASS)
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113010"
    flagged = {
        item.ReferencedSOPInstanceUID
        for series_item in kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert flagged == {str(odd.SOPInstanceUID)}
    assert dciodvfy_errors(kos, tmp_path / "kos.dcm") == []
    body = webhooks.bodies[0]
    assert body["version"] == 1 and {i["sop_instance_uid"] for i in body["images"]} == sops
    assert "PUSH-1" not in json.dumps(body) and "Push" not in json.dumps(body)

    # A late instance: version 2, whose SR supersedes (names) version 1's.
    late = factory.ct_slice(
        study_uid=study, series_uid=series, instance_number=7, rows=SIDE, columns=SIDE, seed=7
    )
    late.PatientName, late.PatientID = "Push^Test", "PUSH-1"
    sent = storescu(daemon.dicom_port, [factory.write(late, tmp_path / "late.dcm")])
    assert successes(sent) == 1, sent.stdout + sent.stderr
    daemon.wait_for(lambda: len(ours(pacs, study, SR_CLASS)) == 2, 90, "version 2's SR")
    daemon.wait_for(lambda: webhooks.versions(study) == [1, 2], 30, "the webhook of version 2")
    second = max(ours(pacs, study, SR_CLASS), key=lambda ds: int(ds.InstanceNumber))
    assert referenced(second) == {*sops, str(late.SOPInstanceUID)}
    (previous,) = second.PredecessorDocumentsSequence
    assert previous.ReferencedSeriesSequence[0].ReferencedSOPSequence[
        0
    ].ReferencedSOPInstanceUID == (sr.SOPInstanceUID)
    assert webhooks.bad_signatures == 0
    assert all(n == 1 for n in Counter(webhooks.keys).values()), webhooks.keys
    studies = daemon.status()["studies"]["recent"]
    mine = next(s for s in studies if s["study_instance_uid"] == study)
    assert (
        mine["version"] == 2 and mine["complete"] and mine["pushed"] == {"dicom": 2, "webhook": 2}
    )
