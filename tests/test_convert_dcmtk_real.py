"""Real images shipped by pydicom and pydicom-data against DCMTK, and the corpus average.

Same method and bars as ``test_convert_dcmtk.py`` (whose module docstring lists where we follow
the standard against DCMTK). DCMTK 3.6.7 has no JPEG 2000 decoder: lossless JPEG 2000 files are
compared with DCMTK's rendering of their uncompressed originals (``*_UNCR``), lossy ones with
its rendering of the values pydicom decoded, and ``test_j2k_plugins_agree`` measures the
decoders' spread (zero). Not here: ``JPEG-lossy.dcm`` (a non-conforming SOS that DCMTK
tolerates and every pydicom plugin refuses: a ConversionError, see test_convert_decode.py),
32-bit RGB and the segmented ALOKA palette (DCMTK cannot read them; unit-tested instead).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels.decoders.base import get_decoder

from tests.test_convert_dcmtk import CASES, COLOR, STRETCH, Build, Case, check, measure

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("dcmj2pnm") is None, reason="DCMTK dcmj2pnm not on PATH"),
]

FRACTIONAL_RESCALE = "standard: DCMTK rounds a non-integer rescale (slope 3.774) to integers"
LOSSY_JPEG = "lossy: IJG (DCMTK) and libjpeg IDCTs differ by 1 stored value; the stretch x3"
YBR = "standard: PS3.3 C.7.6.3.1.2 YBR_FULL equations, which pydicom follows exactly; DCMTK ±2"


def real(name: str, reference: str | None = None) -> Build:
    """A shipped file; DCMTK renders ``reference`` (its uncompressed twin) when given."""

    def build(_where: Path) -> tuple[Path, Path]:
        return Path(get_testdata_file(name)), Path(get_testdata_file(reference or name))

    return build


def decoded_twin(name: str) -> Build:
    """A lossy JPEG 2000 file; DCMTK (no JPEG 2000 codec) renders its pydicom-decoded twin.

    This checks our rendering of the decoded values; ``test_j2k_plugins_agree`` checks the
    decoding itself (the spread between decoders).
    """

    def build(where: Path) -> tuple[Path, Path]:
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.decompress()
        ds.save_as(where / "twin.dcm", enforce_file_format=True)
        return Path(get_testdata_file(name)), where / "twin.dcm"

    return build


def case(name: str, *args: object, reference: str | None = None, **kwargs: object) -> Case:
    return Case(name, real(name, reference), *args, **kwargs)  # type: ignore[arg-type]


REAL_CASES = [
    # grey, uncompressed: every byte order and VR encoding
    case("CT_small.dcm", STRETCH),
    case("MR_small.dcm"),
    case("MR_small_implicit.dcm"),
    case("MR_small_bigendian.dcm"),
    case("693_UNCR.dcm"),
    case("MR2_UNCR.dcm", min_equal=0.95, why=FRACTIONAL_RESCALE),
    case("RG1_UNCR.dcm"),
    case("RG3_UNCR.dcm"),
    case("MR-SIEMENS-DICOM-WithOverlays.dcm"),
    case("emri_small.dcm", STRETCH, frame=5),
    case("emri_small_big_endian.dcm", STRETCH, frame=5),
    case("image_dfl.dcm", STRETCH),
    case("mlut_18.dcm", STRETCH),
    case("vlut_04.dcm", ("+Wl", "1")),
    case("liver_1frame.dcm", STRETCH),
    case("rtdose_1frame.dcm", STRETCH),
    # grey, compressed
    case("MR_small_RLE.dcm"),
    case("emri_small_RLE.dcm", STRETCH, frame=5),
    case("MR_small_jpeg_ls_lossless.dcm", tool="dcml2pnm"),
    case("emri_small_jpeg_ls_lossless.dcm", STRETCH, frame=5, tool="dcml2pnm"),
    case("JPEGLSNearLossless_16.dcm", STRETCH, tool="dcml2pnm"),
    case("JPEG-LL.dcm", STRETCH),
    case("JPGLosslessP14SV1_1s_1f_8b.dcm"),
    case("JPGExtended.dcm", STRETCH, max_delta=3, min_equal=0.98, why=LOSSY_JPEG),
    case("MR_small_jp2klossless.dcm", reference="MR_small.dcm"),
    case("693_J2KR.dcm", reference="693_UNCR.dcm"),
    Case("693_J2KI.dcm", decoded_twin("693_J2KI.dcm")),
    Case("MR2_J2KI.dcm", decoded_twin("MR2_J2KI.dcm"), min_equal=0.95, why=FRACTIONAL_RESCALE),
    # colour
    case("SC_rgb.dcm", COLOR),
    case("SC_rgb_expb.dcm", COLOR),
    case("SC_rgb_16bit.dcm", COLOR),
    case("SC_rgb_rle_16bit.dcm", COLOR),
    case("color-pl.dcm", COLOR),
    case("US1_UNCR.dcm", COLOR),
    case("SC_ybr_full_uncompressed.dcm", COLOR, max_delta=2, min_equal=0.5, why=YBR),
    case("SC_ybr_full_422_uncompressed.dcm", COLOR, min_equal=0.5, why=YBR),
    case("SC_rgb_jpeg_dcmtk.dcm", COLOR),
    case("SC_rgb_dcmtk_+eb+cy+np.dcm", COLOR),
    case("SC_rgb_dcmtk_+eb+cr.dcm", COLOR),
    case("SC_rgb_jpeg_gdcm.dcm", COLOR),
    case("color3d_jpeg_baseline.dcm", COLOR, frame=60),
    case("examples_ybr_color.dcm", COLOR, frame=15),
    case("SC_rgb_jls_lossy_sample.dcm", COLOR, tool="dcml2pnm"),
    case("US1_J2KR.dcm", COLOR, reference="US1_UNCR.dcm"),
    Case("US1_J2KI.dcm", decoded_twin("US1_J2KI.dcm"), COLOR),
    case("OBXXXX1A.dcm", COLOR),
    case("OBXXXX1A_expb.dcm", COLOR),
    case("OBXXXX1A_rle.dcm", COLOR),
    case("examples_palette.dcm", COLOR),
]


@pytest.mark.parametrize("case", REAL_CASES, ids=[c.name for c in REAL_CASES])
def test_real_file_agrees_with_dcmtk(case: Case) -> None:
    """A shipped real image renders like dcmj2pnm within its bar."""
    check(case)


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "US1_J2KI.dcm", "RG1_J2KR.dcm"])
def test_j2k_plugins_agree(name: str) -> None:
    """Every installed JPEG 2000 decoder gives the same pixels: the lossy decoder spread is 0."""
    ds = pydicom.dcmread(get_testdata_file(name))
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    arrays = [decoder.as_array(ds, decoding_plugin=p)[0] for p in decoder.available_plugins]
    assert len(arrays) >= 2, "needs two JPEG 2000 plugins (pylibjpeg-openjpeg and Pillow)"
    assert all(np.array_equal(arrays[0], other) for other in arrays[1:])


def test_average_agreement_over_all_cases() -> None:
    """Where we mean to agree with DCMTK, on average >= 99% of pixels equal its output.

    The cases where we follow the standard against DCMTK (``why`` starts with "standard") are
    left out of the mean: there the difference is the point, and each has its own bar.
    """
    every = [*CASES, *REAL_CASES]
    agreeing = [c for c in every if not c.why.startswith("standard")]
    assert len(agreeing) >= 0.9 * len(every)
    mean = float(np.mean([measure(c)[1] for c in agreeing]))
    overall = float(np.mean([measure(c)[1] for c in every]))
    assert mean >= 0.99, f"mean agreement {mean:.4%} ({overall:.4%} with the standard's cases)"
