"""End to end with real processes: DCMTK -> `pacs-embed run` (private Redis, emulator, workers).

The embeddings come from the local emulator, NOT MedImageInsight: a deterministic function of
image content, which is what these tests need (identical pixels -> identical vectors).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import factory
from tests.daemon import Daemon, storescu, successes

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed"),
]

N = 20
PHI = (
    factory.PATIENT_NAME,
    "Doe",
    factory.PATIENT_ID,
    factory.PATIENT_BIRTH_DATE,
    factory.ACCESSION_NUMBER,
)


def write_series(directory: Path, n: int = N, seed: int = 0) -> tuple[list[Path], list[str]]:
    directory.mkdir(parents=True, exist_ok=True)
    series = factory.ct_series(n, seed=seed, identical=(0, 1))
    paths = [factory.write(ds, directory / f"{i:03d}.dcm") for i, ds in enumerate(series)]
    return paths, [str(ds.SOPInstanceUID) for ds in series]


def export(daemon: Daemon, out: Path) -> dict[str, np.ndarray]:
    result = daemon.cli("embeddings", "export", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with np.load(out) as data:
        return {key: data[key] for key in data.files}


def test_series_in_embeddings_out(daemon: Daemon, tmp_path: Path) -> None:
    """20 CT slices via storescu come out as 20 unit 1024-d vectors; a resend adds nothing."""
    paths, uids = write_series(tmp_path / "series")
    daemon.start()
    started = time.monotonic()
    sent = storescu(daemon.dicom_port, paths)
    assert successes(sent) == N, sent.stdout + sent.stderr
    status = daemon.wait_embedded(N)
    elapsed = time.monotonic() - started
    print(f"\n{N} images stored and embedded in {elapsed:.2f} s ({N / elapsed:.1f} images/s)")
    assert status["instances"]["failed"] == 0
    assert status["instances"]["received"] == N

    data = export(daemon, tmp_path / "e.npz")
    assert sorted(data["sop_instance_uids"]) == sorted(uids)
    vectors = data["vectors"]
    assert vectors.shape == (N, 1024) and vectors.dtype == np.float32
    assert np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    by_uid = dict(zip(data["sop_instance_uids"], vectors, strict=True))
    np.testing.assert_array_equal(by_uid[uids[0]], by_uid[uids[1]])  # identical pixels
    others = np.stack([by_uid[u] for u in uids[1:]])
    similarity = others @ others.T
    np.fill_diagonal(similarity, 0)
    assert similarity.max() < 0.99999, "different slices must not embed identically"

    enqueued_before = _images_enqueued(daemon)
    resent = storescu(daemon.dicom_port, paths)
    assert successes(resent) == N
    # Anything a resend handed on was submitted before its 0x0000: once the dispatcher reports
    # an empty backlog after that, it would have been converted again (and counted).
    acked = time.time()
    daemon.wait_for(lambda: _dispatcher_idle_since(daemon, acked), 30, "dispatcher idle")
    status = daemon.status()
    assert status["counters"]["converted"] == N
    assert status["instances"]["received"] == N
    assert status["instances"]["embedded"] == N
    assert _images_enqueued(daemon) == enqueued_before == N
    assert sum(1 for line in daemon.log_lines() if line.get("event") == "store.duplicate") == N

    assert daemon.stop() == 0
    assert daemon.family_alive() == [], "Ctrl-C must stop every process `run` started"
    log_text = daemon.log_path.read_text()
    for value in PHI:
        assert value not in log_text, f"PHI {value!r} in the daemon's log"


def test_kill9_after_ack_loses_nothing(tmp_path: Path) -> None:
    """kill -9 of the whole daemon right after storescu succeeds: a restart embeds all, once."""
    paths, uids = write_series(tmp_path / "series", seed=7)
    state, log = tmp_path / "var", tmp_path / "daemon.log"
    # A slow endpoint, so the kill lands while work is still in flight.
    first = Daemon(state, log, EMULATOR__LATENCY_MS="1500", QUEUE__LINGER_SECONDS="0.3").start()
    sent = storescu(first.dicom_port, paths)
    assert successes(sent) == N, sent.stdout + sent.stderr
    embedded_at_kill = first.status()["instances"]["embedded"]
    first.kill9()
    assert first.family_alive() == [], "children must die with a killed `run`"
    assert embedded_at_kill < N, "the kill came too late to test anything"

    second = Daemon(state, log)
    second.start()
    try:
        second.wait_embedded(N)
        second.wait_for(lambda: _settled(second.status()), 30, "nothing in flight")
        status = second.status()
        assert status["instances"]["embedded"] == N
        assert status["instances"]["failed"] == 0
        data = export(second, tmp_path / "e.npz")
        assert sorted(data["sop_instance_uids"]) == sorted(uids)  # each exactly once
    finally:
        second.stop()


def _dispatcher_idle_since(daemon: Daemon, since: float) -> bool:
    """A dispatcher report newer than ``since`` says nothing is waiting or converting."""
    reports = daemon.status()["dispatchers"].values()
    return bool(reports) and all(r["at"] > since and r["backlog"] == 0 for r in reports)


def _settled(status: dict[str, Any]) -> bool:
    """Every received instance is in a final state."""
    instances = status["instances"]
    return instances["spooled"] == instances["converting"] == instances["queued"] == 0


def _images_enqueued(daemon: Daemon) -> int:
    return sum(
        line.get("images", 0)
        for line in daemon.log_lines()
        if line.get("event") == "batch.enqueued"
    )
