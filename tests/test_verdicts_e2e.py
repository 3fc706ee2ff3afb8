"""Verdicts end to end: `pacs-embed reference import`, DCMTK storescu -> `pacs-embed run`, then
the stored verdicts (export), the admin /verdicts and /search routes, and `pacs-embed search`.

Embeddings come from the local emulator, NOT MedImageInsight: a deterministic function of the
picture, which is all an outlier test needs (similar pictures -> nearby vectors).
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from emulator.model import embed_image
from pipeline.convert import to_png
from tests import factory
from tests.daemon import Daemon, storescu, successes

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed"),
]

SIDE = 128  # small slices: the conversion resizes to 512 either way
REFERENCE = 110  # >= min_reference (100 at alpha 0.01), so the cohort is scored at once
NORMALS = 10


def head_slice(study: str, series: str) -> object:
    """An axial head (skull ring, brain) sent under the chest series' header: off-cohort."""
    yy, xx = np.mgrid[-1 : 1 : SIDE * 1j, -1 : 1 : SIDE * 1j]
    r = np.hypot(xx / 0.7, yy / 0.85)
    hu = np.where(r < 1, np.where(r > 0.9, 1200.0, 35.0), -1000.0)
    pixels = np.clip(hu + 1024, 0, 4095).astype(np.int16)
    return factory.ct_slice(study_uid=study, series_uid=series, instance_number=99, pixels=pixels)


def reference_file(path: Path) -> Path:
    """CT/CHEST reference vectors: other phantom slices, converted and embedded as the daemon
    would (same conversion, same emulator function)."""
    study, series = factory.new_uid(), factory.new_uid()
    vectors = [
        embed_image(
            to_png(
                factory.ct_slice(
                    study_uid=study,
                    series_uid=series,
                    instance_number=i % 50,
                    rows=SIDE,
                    columns=SIDE,
                    seed=10_000 + i,
                )
            )[0]
        )
        for i in range(REFERENCE)
    ]
    np.savez(path, vectors=np.stack(vectors), cohort="CT/CHEST")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, dict[str, str]]]:
    """A daemon with an imported reference that has received 10 chest slices + 1 head slice."""
    tmp = tmp_path_factory.mktemp("verdicts")
    daemon = Daemon(tmp / "var", tmp / "daemon.log", QUEUE__LINGER_SECONDS="0.3")
    daemon.start()
    try:
        imported = daemon.cli("reference", "import", str(reference_file(tmp / "ref.npz")))
        assert imported.returncode == 0, imported.stderr
        assert "CT/CHEST: 110 vectors, scored" in imported.stdout
        study, series = factory.new_uid(), factory.new_uid()
        slices = [
            factory.ct_slice(
                study_uid=study,
                series_uid=series,
                instance_number=i + 1,
                rows=SIDE,
                columns=SIDE,
                seed=i,
            )
            for i in range(NORMALS)
        ] + [head_slice(study, series)]
        paths = [factory.write(ds, tmp / "in" / f"{i:03d}.dcm") for i, ds in enumerate(slices)]
        sent = storescu(daemon.dicom_port, paths)
        assert successes(sent) == len(paths), sent.stdout + sent.stderr
        daemon.wait_embedded(len(paths))
        uids = {
            "study": study,
            "series": series,
            "odd": str(slices[-1].SOPInstanceUID),
            "normal": str(slices[0].SOPInstanceUID),
            "normal_file": str(paths[0]),
        }
        yield daemon, uids
    finally:
        daemon.stop()


def admin_get(daemon: Daemon, path: str) -> dict[str, object]:
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.admin_port}{path}")
    request.add_header("Authorization", f"Bearer {daemon.token()}")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        return dict(json.load(response))


def test_off_cohort_image_is_flagged_in_the_stored_verdicts(
    run: tuple[Daemon, dict[str, str]], tmp_path: Path
) -> None:
    """The head slice sent among chest slices is flagged (p at the floor); the chests are not."""
    daemon, uids = run
    result = daemon.cli("embeddings", "export", "--out", str(tmp_path / "e.npz"))
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "e.npz") as data:
        rows = {uid: i for i, uid in enumerate(data["sop_instance_uids"])}
        odd = rows[uids["odd"]]
        assert set(data["cohort"]) == {"CT/CHEST"}
        assert data["outlier"][odd] and data["outlier"].sum() == 1
        assert data["p_value"][odd] < 0.01
        assert data["p_value"][odd] == data["p_value"].min()
        assert not data["label_mismatch"].any()  # label check is off with the local emulator
    series = admin_get(daemon, f"/verdicts?series={uids['series']}")
    assert series["images"] == NORMALS + 1 and series["outlier_instances"] == 1
    assert series["outlier"] is False  # 1 flag in 11 images is within chance (binomial rule)
    log_text = daemon.log_path.read_text()
    assert '"detect.flagged"' in log_text and uids["odd"] in log_text
    for phi in (factory.PATIENT_NAME, factory.PATIENT_ID, factory.ACCESSION_NUMBER):
        assert phi not in log_text


def test_search_finds_the_nearest_stored_images(run: tuple[Daemon, dict[str, str]]) -> None:
    """`search --file` embeds a DICOM file via the running emulator and finds its own stored
    copy first; /search by SOP UID answers over the admin API."""
    daemon, uids = run
    result = daemon.cli("search", "--file", uids["normal_file"], "--top", "3", "--json")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)["hits"]
    assert hits[0]["sop_instance_uid"] == uids["normal"]
    assert hits[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    doc = admin_get(daemon, f"/search?sop={uids['odd']}&top=5")
    assert len(doc["hits"]) == 5  # type: ignore[arg-type]
    assert uids["odd"] not in {h["sop_instance_uid"] for h in doc["hits"]}  # type: ignore[union-attr]
