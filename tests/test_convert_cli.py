"""`pacs-embed convert` runs the daemon's conversion: frames to a directory, skips, settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import factory

pytestmark = pytest.mark.e2e  # real subprocesses of the console script


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PACS_EMBED_")}
    return subprocess.run(
        [sys.executable, "-m", "pacs_embed", "convert", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**clean, **env},
    )


def test_multiframe_to_directory_follows_the_frame_policy(tmp_path: Path) -> None:
    """With frame_policy every_n 4 a 10-frame object gives frames 0, 4, 8 as native-size PNGs."""
    source = factory.write(factory.mono_multiframe(frames=10), tmp_path / "mf.dcm")
    result = cli(
        "--native-size",
        str(source),
        str(tmp_path / "out"),
        PACS_EMBED_CONVERT__FRAME_POLICY="every_n",
        PACS_EMBED_CONVERT__FRAME_PARAM="4",
    )
    assert result.returncode == 0, result.stderr
    written = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name[-8:] for p in written] == ["0000.png", "0004.png", "0008.png"]
    with Image.open(written[1]) as image:
        assert image.size == (64, 64) and np.asarray(image).std() == 0


def test_skipped_objects_exit_3_with_the_reason(tmp_path: Path) -> None:
    """An SR, or a slice the CT series policy leaves out, exits 3 naming why; nothing written."""
    sr = factory.write(factory.basic_text_sr(), tmp_path / "sr.dcm")
    result = cli(str(sr), str(tmp_path / "sr.png"))
    assert (result.returncode, "no Pixel Data" in result.stderr) == (3, True)
    ct = factory.ct_slice(study_uid="1.2", series_uid="1.3", instance_number=2, rows=16, columns=16)
    path = factory.write(ct, tmp_path / "ct.dcm")
    result = cli(
        str(path),
        str(tmp_path / "ct.png"),
        PACS_EMBED_CONVERT__MODALITY__CT__SERIES_POLICY="every_n",
        PACS_EMBED_CONVERT__MODALITY__CT__SERIES_PARAM="2",
    )
    assert (result.returncode, "not sampled" in result.stderr) == (3, True)
    assert not (tmp_path / "ct.png").exists() and not (tmp_path / "sr.png").exists()
