"""Our 8-bit rendering at native size against DCMTK ``dcmj2pnm`` (DESIGN.md §4 reference).

Each case writes a DICOM file, renders it with ``dcmj2pnm`` (raw PGM/PPM) using the same VOI, and
requires max |delta| <= 1 and >= 99% of pixels exactly equal. Measured agreement is exact (100%)
for every MONOCHROME2 case here; windowed MONOCHROME1 agrees on >= 99.97% (a pixel whose value
lands within an ulp of an integer may truncate differently). MONOCHROME1 + VOI LUT Sequence only
asserts |delta| <= 1: DCMTK computes ``255 - v*254/2**bits`` there (never black), we invert exactly.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from pipeline.convert import ConvertOptions, render_frame
from pipeline.convert.pixels import Rescale, stretch_window
from tests import factory

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("dcmj2pnm") is None, reason="DCMTK dcmj2pnm not on PATH"),
]

NATIVE = ConvertOptions(size=0)


def dcmj2pnm(path: Path, *voi_args: str) -> npt.NDArray[np.uint8]:
    """DCMTK's 8-bit rendering of ``path`` with the given VOI options."""
    out = path.with_suffix(".pnm")
    subprocess.run(["dcmj2pnm", "--write-raw-pnm", *voi_args, str(path), str(out)], check=True)
    with Image.open(out) as image:
        return np.asarray(image)


def agreement(ours: npt.NDArray[np.uint8], theirs: npt.NDArray[np.uint8]) -> tuple[int, float]:
    """(max |delta|, fraction exactly equal)."""
    assert ours.shape == theirs.shape
    delta = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    return int(delta.max()), float(np.mean(delta == 0))


def assert_agrees(ds: Dataset, tmp_path: Path, *voi_args: str, exact: float = 0.99) -> None:
    path = factory.write(ds, tmp_path / "in.dcm")
    max_delta, equal = agreement(
        render_frame(pydicom.dcmread(path), 0, NATIVE), dcmj2pnm(path, *voi_args)
    )
    assert max_delta <= 1, f"max |delta| {max_delta}"
    assert equal >= exact, f"only {equal:.4%} of pixels equal"


def _ct(**kwargs: object) -> Dataset:
    return factory.ct_slice(study_uid="1.2.3", series_uid="1.2.4", instance_number=1, **kwargs)  # type: ignore[arg-type]


def test_factory_ct_window(tmp_path: Path) -> None:
    """The factory CT with its 40/400 window matches dcmj2pnm +Wi 1."""
    assert_agrees(_ct(), tmp_path, "+Wi", "1")


def test_ct_ramp_lung_window(tmp_path: Path) -> None:
    """Every stored value from -500 to 2699 with a lung window matches DCMTK (truncation)."""
    ds = _ct(pixels=(np.arange(3200) - 500).astype(np.int16).reshape(40, 80))
    ds.WindowCenter, ds.WindowWidth = -600.3, 1500.7
    assert_agrees(ds, tmp_path, "+Wi", "1", exact=1.0)


def test_sigmoid_window(tmp_path: Path) -> None:
    """VOI LUT Function SIGMOID matches DCMTK."""
    ds = _ct()
    ds.VOILUTFunction = "SIGMOID"
    assert_agrees(ds, tmp_path, "+Wi", "1", exact=1.0)


def test_monochrome1_window(tmp_path: Path) -> None:
    """A windowed MONOCHROME1 CR matches DCMTK (inversion before truncation)."""
    ds = factory.mono1_cr(window=(1800.0, 3000.0))
    assert_agrees(ds, tmp_path, "+Wi", "1", exact=0.999)


def test_voi_lut_sequence(tmp_path: Path) -> None:
    """A 12-bit VOI LUT Sequence on MONOCHROME2 matches dcmj2pnm +Wl 1 (v >> 4)."""
    ds = factory.with_voi_lut_sequence(factory.mono1_cr(), lut_bits=12)
    ds.PhotometricInterpretation = "MONOCHROME2"
    assert_agrees(ds, tmp_path, "+Wl", "1", exact=1.0)


def test_voi_lut_sequence_monochrome1_within_one(tmp_path: Path) -> None:
    """MONOCHROME1 + VOI LUT: within 1 of DCMTK, whose inversion is off by one (see docstring)."""
    ds = factory.with_voi_lut_sequence(factory.mono1_cr(), lut_bits=12)
    assert_agrees(ds, tmp_path, "+Wl", "1", exact=0.0)


def test_percentile_stretch_equals_explicit_window(tmp_path: Path) -> None:
    """With no VOI in the header, our percentile window given to dcmj2pnm +Ww gives our image."""
    ds = _ct()
    del ds.WindowCenter, ds.WindowWidth, ds.WindowCenterWidthExplanation
    hu = ds.pixel_array.astype(np.float64) - 1024.0
    window = stretch_window(hu.ravel(), None, NATIVE.percentiles)
    assert Rescale(1.0, -1024.0) == Rescale(float(ds.RescaleSlope), float(ds.RescaleIntercept))
    assert_agrees(ds, tmp_path, "+Ww", f"{window.center!r}", f"{window.width!r}", exact=1.0)


def test_rle_compressed_ct(tmp_path: Path) -> None:
    """An RLE file made by DCMTK dcmcrle decodes (pylibjpeg-rle) and renders like DCMTK."""
    src = factory.write(_ct(), tmp_path / "src.dcm")
    subprocess.run(["dcmcrle", str(src), str(tmp_path / "rle.dcm")], check=True)
    ds = pydicom.dcmread(tmp_path / "rle.dcm")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert_agrees(ds, tmp_path, "+Wi", "1", exact=1.0)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "RG3_UNCR.dcm"])
def test_real_files(name: str, tmp_path: Path) -> None:
    """Real files render like DCMTK: their own first window, or CT_small's explicit 40/400."""
    ds = pydicom.dcmread(get_testdata_file(name))
    exact = 0.999 if ds.PhotometricInterpretation == "MONOCHROME1" else 1.0
    if "WindowCenter" in ds:
        assert_agrees(ds, tmp_path, "+Wi", "1", exact=exact)
    else:
        ds.WindowCenter, ds.WindowWidth = 40, 400
        assert_agrees(ds, tmp_path, "+Ww", "40", "400", exact=1.0)
