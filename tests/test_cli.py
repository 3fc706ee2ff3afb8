"""The command line: `convert` runs the daemon's conversion; config errors exit 2, clearly."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests import factory


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs_embed", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_convert_writes_the_endpoint_png(tmp_path: Path) -> None:
    """`convert IN OUT.png` writes an 8-bit 512x512 grey PNG; --native-size keeps Rows x Columns."""
    ds = factory.ct_slice(
        study_uid=factory.new_uid(),
        series_uid=factory.new_uid(),
        instance_number=1,
        rows=96,
        columns=80,
    )
    source = factory.write(ds, tmp_path / "ct.dcm")
    result = cli("convert", str(source), str(tmp_path / "out.png"))
    assert result.returncode == 0, result.stderr
    image = Image.open(io.BytesIO((tmp_path / "out.png").read_bytes()))
    assert (image.mode, image.size) == ("L", (512, 512))
    result = cli("convert", "--native-size", str(source), str(tmp_path / "native.png"))
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "native.png") as native:
        assert native.size == (80, 96)


def test_convert_refuses_garbage_cleanly(tmp_path: Path) -> None:
    """A file that is not DICOM: exit 1 with a one-line reason, no traceback."""
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    result = cli("convert", str(bad), str(tmp_path / "out.png"))
    assert result.returncode == 1
    assert "cannot convert" in result.stderr and "Traceback" not in result.stderr


def test_bad_setting_exits_2_naming_it() -> None:
    """An invalid env setting stops any command before it starts, naming the setting."""
    import os

    env = {**os.environ, "PACS_EMBED_LISTENER__PORT": "not-a-port"}
    result = cli("status", env=env)
    assert result.returncode == 2
    assert "listener.port" in result.stderr and "Traceback" not in result.stderr
