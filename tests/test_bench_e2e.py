"""Smoke test of bench/e2e.py at a tiny size: every phase runs on the real daemon and prints
its figure. It asserts no rate (benchmarks are never timed tests), only that they are there."""

from __future__ import annotations

import shutil

import pytest

from bench.e2e import Options, run
from tests import orthanc

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed"),
    pytest.mark.skipif(not orthanc.available(), reason="Orthanc not installed"),
]


def test_bench_e2e_prints_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    """40 instances over 2 studies and a 20-slice latency study go through all four phases."""
    run(Options(instances=40, studies=2, slices=20, stable=2.0))
    out = capsys.readouterr().out
    assert "NOT MedImageInsight" in out
    for figure in (
        "ingest capacity",
        "endpoint capacity",
        "of the slower reference",
        "RSS over C",
        "last C-STORE -> SR in Orthanc",
    ):
        assert figure in out, out
    assert "failed 0" in out, out
