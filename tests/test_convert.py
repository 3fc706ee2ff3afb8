"""Unit tests of pipeline.convert: the grey pipeline, colour, frames, caps, errors, real files."""

from __future__ import annotations

import io
import pickle  # round-trips our own objects: what ProcessPoolExecutor does

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline.convert import ConvertedImage, ConvertOptions, convert_file, render_frame, to_png
from pipeline.convert.options import select_frames
from pipeline.convert.pixels import (
    Lut,
    Rescale,
    Window,
    gray_to_u8,
    stretch_window,
    voi_to_u8,
    window_level,
)
from pipeline.errors import ConfigError, ConversionError, NoPixelDataError
from tests import factory

NATIVE = ConvertOptions(size=0)
PCT = (0.5, 99.5)


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _ct() -> Dataset:
    return factory.ct_slice(
        study_uid=factory.new_uid(), series_uid=factory.new_uid(), instance_number=1
    )


def _u8(x: list[float], voi: Window | Lut, mono1: bool = False) -> list[int]:
    return voi_to_u8(np.asarray(x, dtype=np.float64), voi, mono1).tolist()


# --- window functions -------------------------------------------------------------------------


def test_linear_window_edges() -> None:
    """LINEAR: <= c-0.5-(w-1)/2 is 0, > c-0.5+(w-1)/2 is 255, the centre truncates to 127."""
    w = Window(40.0, 400.0)
    assert _u8([-160.0, -159.0, 39.5, 239.0, 239.5, 3000.0], w) == [0, 0, 127, 255, 255, 255]


def test_linear_window_truncates_like_dcmtk() -> None:
    """The 0..255 value is truncated, not rounded (y = 127.82 -> 127)."""
    y = window_level(np.array([40.0]), Window(40.0, 400.0))[0]
    assert 127.5 < y < 128.0
    assert _u8([40.0], Window(40.0, 400.0)) == [127]


def test_width_one_is_a_step() -> None:
    """Width 1 (the smallest legal width) is a threshold at c - 0.5, without dividing by zero."""
    assert _u8([-1.0, -0.5, 0.0, 1.0], Window(0.0, 1.0)) == [0, 0, 255, 255]


def test_sigmoid_window() -> None:
    """SIGMOID: 255 / (1 + exp(-4 (x - c) / w)); the centre is 127.5 -> 127, tails saturate."""
    s = Window(100.0, 50.0, "SIGMOID")
    assert _u8([100.0, -10_000.0, 10_000.0], s) == [127, 0, 255]
    assert _u8([112.5], s) == [int(255 / (1 + np.exp(-1.0)))]


def test_linear_exact_window() -> None:
    """LINEAR_EXACT: (x - c) / w + 0.5 clipped to 0..1, so c - w/2 is 0 and c + w/2 is 255."""
    e = Window(40.0, 400.0, "LINEAR_EXACT")
    assert _u8([-160.0, 40.0, 240.0], e) == [0, 127, 255]
    assert _u8([-159.9], e) == [0] and _u8([-158.0], e) == [1]


def test_monochrome1_inverts_before_truncating() -> None:
    """MONO1 is floor(255 - y): the centre 127.5 gives 127, not 255 - 127 = 128."""
    w = Window(40.0, 400.0)
    assert _u8([39.5, -1000.0, 1000.0], w, mono1=True) == [127, 255, 0]


# --- modality and VOI LUTs --------------------------------------------------------------------


def test_rescale_applies_before_window() -> None:
    """Stored 1064 with intercept -1024 is 40 HU: the CT window centre (127)."""
    stored = np.array([[1064, 0, 2000]], dtype=np.int16)
    out = gray_to_u8(stored, Rescale(1.0, -1024.0), Window(40.0, 400.0), False, PCT)
    assert out.tolist() == [[127, 0, 255]]


def test_modality_lut_sequence_is_a_table() -> None:
    """A Modality LUT maps stored values through its table, clamped at both ends."""
    mlut = Lut(first_mapped=10, bits=16, data=np.array([0, 100, 300], dtype=np.int64))
    stored = np.array([[5, 10, 11, 12, 99]], dtype=np.uint16)
    out = gray_to_u8(stored, mlut, Window(100.5, 201.0), False, PCT)
    assert out.tolist() == [[0, 0, 127, 255, 255]]


def test_voi_lut_sequence_shifts_to_8_bits() -> None:
    """A 12-bit VOI LUT value v becomes v >> 4; MONOCHROME1 gives 255 - (v >> 4)."""
    lut = Lut(first_mapped=100, bits=12, data=np.array([0, 15, 16, 2048, 4095], dtype=np.int64))
    x = [0.0, 100.0, 101.0, 102.0, 103.0, 104.0, 9999.0]
    assert _u8(x, lut) == [0, 0, 0, 1, 128, 255, 255]
    assert _u8(x, lut, mono1=True) == [255, 255, 255, 254, 127, 0, 0]


def test_voi_lut_sequence_from_header() -> None:
    """A dataset's VOI LUT Sequence (no window) drives the output as v >> (bits - 8)."""
    ds = factory.with_voi_lut_sequence(factory.mono1_cr(rows=32, columns=32), lut_bits=12)
    ds.PhotometricInterpretation = "MONOCHROME2"
    lut = np.asarray(ds.VOILUTSequence[0].LUTData)
    expected = (lut[ds.pixel_array] >> 4).astype(np.uint8)
    assert np.array_equal(render_frame(ds, 0, NATIVE), expected)


@pytest.mark.parametrize(
    "voi",
    [Window(40.0, 400.0), Window(-600, 1500, "SIGMOID"), Window(40.0, 333.3, "LINEAR_EXACT"), None],
)
@pytest.mark.parametrize("mono1", [False, True])
def test_lookup_table_path_equals_per_pixel_path(voi: Window | None, mono1: bool) -> None:
    """16-bit input through the 64k lookup table gives exactly the per-pixel float result."""
    rng = np.random.default_rng(1)
    stored = rng.integers(-2000, 3000, size=(64, 64)).astype(np.int16)
    mod = Rescale(0.5, -300.25)
    fast = gray_to_u8(stored, mod, voi, mono1, PCT)
    slow = gray_to_u8(stored.astype(np.int64), mod, voi, mono1, PCT)  # int64: no LUT
    assert np.array_equal(fast, slow)


def test_percentile_stretch_maps_percentiles_to_black_and_white() -> None:
    """Without VOI, the 0.5th percentile and below are 0, the 99.5th and above 255."""
    values = np.arange(1000, dtype=np.float64)
    window = stretch_window(values, None, PCT)
    out = voi_to_u8(values, window, False)
    assert out[:6].tolist() == [0] * 6  # values 0..4 <= lo = 4
    assert out[995:].tolist() == [255] * 5  # values > hi = 994
    assert out[994] >= 254  # hi itself: 255 up to DCMTK's floating-point arithmetic
    assert 0 < out[500] < 255


def test_window_index_selects_pair_and_falls_back_to_first() -> None:
    """window_index picks the n-th Window Center/Width pair; a missing pair means the first."""
    ds = _ct()
    ds.WindowCenter, ds.WindowWidth = [40, -600], [400, 1500]
    first = render_frame(ds, 0, NATIVE)
    second = render_frame(ds, 0, ConvertOptions(size=0, window_index=1))
    third = render_frame(ds, 0, ConvertOptions(size=0, window_index=2))
    assert not np.array_equal(first, second)
    assert np.array_equal(first, third)


def test_window_in_shared_functional_groups_is_used() -> None:
    """A window held only in the Shared Functional Groups (enhanced objects) is applied."""
    ds = _ct()
    top = render_frame(ds, 0, NATIVE)
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 40, 400
    group = Dataset()
    group.FrameVOILUTSequence = Sequence([voi])
    del ds.WindowCenter, ds.WindowWidth
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    assert np.array_equal(render_frame(ds, 0, NATIVE), top)


# --- colour and frames ------------------------------------------------------------------------


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_planar_configuration_is_honoured(planar: int) -> None:
    """RGB with Planar Configuration 0 or 1 comes out as the same interleaved RGB PNG."""
    ds = factory.rgb_us(planar=planar)
    image = _png(to_png(ds, NATIVE)[0])
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), factory.rgb_pixels(120, 160)[0])


def test_ybr_full_is_converted_to_rgb() -> None:
    """YBR_FULL pixels are converted to RGB (within YCbCr rounding of the RGB original)."""
    ybr = render_frame(pydicom.dcmread(get_testdata_file("SC_ybr_full_uncompressed.dcm")), 0)
    rgb = render_frame(pydicom.dcmread(get_testdata_file("SC_rgb.dcm")), 0)
    diff = np.abs(ybr.astype(int) - rgb.astype(int))
    assert diff.max() <= 8 and diff.mean() < 1.0  # unconverted YCbCr would be off by ~100


def test_palette_color_becomes_rgb() -> None:
    """PALETTE COLOR is expanded through its 16-bit palette to visible 8-bit RGB."""
    result = convert_file(get_testdata_file("OBXXXX1A.dcm"))
    image = np.asarray(_png(result.pngs[0]))
    assert image.shape == (512, 512, 3)
    assert image.max() > 200  # 16-bit entries truncated to their low byte would stay dark


@pytest.mark.parametrize(
    ("policy", "param", "n", "expected"),
    [
        ("all", 1, 4, [0, 1, 2, 3]),
        ("middle", 1, 10, [5]),
        ("middle", 1, 1, [0]),
        ("every_n", 3, 10, [0, 3, 6, 9]),
        ("max_k", 4, 10, [0, 3, 6, 9]),
        ("max_k", 3, 9, [0, 4, 8]),
        ("max_k", 20, 5, [0, 1, 2, 3, 4]),
        ("max_k", 1, 9, [4]),
    ],
)
def test_select_frames(policy: str, param: int, n: int, expected: list[int]) -> None:
    """Frame policies pick the documented 0-based frame indices."""
    assert select_frames(n, policy, param) == expected


def test_frame_policy_picks_the_frames_rendered() -> None:
    """The PNGs are the selected frames, in order (frame f of the fixture is filled with 10 f)."""
    ds = factory.mono_multiframe(frames=10)
    ds.WindowCenter, ds.WindowWidth = 128, 256  # identity for 8-bit values
    pngs = to_png(ds, ConvertOptions(size=0, frame_policy="every_n", frame_param=4))
    assert [int(np.asarray(_png(p))[0, 0]) for p in pngs] == [0, 40, 80]


# --- output -----------------------------------------------------------------------------------


def test_png_is_512_square_grey_by_default() -> None:
    """Default output is one 8-bit 512x512 mode-L PNG, whatever the native size."""
    ds = factory.ct_slice(
        study_uid="1.2.3", series_uid="1.2.4", instance_number=1, rows=300, columns=200
    )
    (data,) = to_png(ds)
    image = _png(data)
    assert (image.mode, image.size) == ("L", (512, 512))


def test_native_size_keeps_dimensions() -> None:
    """size=0 keeps Rows x Columns."""
    ds = factory.ct_slice(
        study_uid="1.2.3", series_uid="1.2.4", instance_number=1, rows=40, columns=70
    )
    assert _png(to_png(ds, NATIVE)[0]).size == (70, 40)


def test_convert_file_header_fields_and_no_phi(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """convert_file returns UIDs, SOP class, modality, body part, frames and no patient data."""
    ds = _ct()
    result = convert_file(factory.write(ds, tmp_path / "ct.dcm"))
    [record] = result.images
    assert record.sop_instance_uid == ds.SOPInstanceUID
    assert record.study_instance_uid == ds.StudyInstanceUID
    assert record.series_instance_uid == ds.SeriesInstanceUID
    assert record.sop_class_uid == ds.SOPClassUID
    assert (record.modality, record.body_part, record.view, result.frames) == (
        "CT",
        "CHEST",
        "UNKNOWN",
        (0,),
    )
    fields = repr({k: v for k, v in vars(result).items() if k != "pngs"})
    for phi in (factory.PATIENT_NAME, factory.PATIENT_ID, factory.ACCESSION_NUMBER, "Doe"):
        assert phi not in fields
    assert pickle.loads(pickle.dumps(result)) == result  # noqa: S301
    assert pickle.loads(pickle.dumps(convert_file)) is convert_file  # noqa: S301


def test_series_identical_pair_gives_identical_png() -> None:
    """The factory's identical slices render to the same PNG bytes; other slices differ."""
    series = factory.ct_series(3, rows=64, columns=64)
    pngs = [to_png(ds)[0] for ds in series]
    assert pngs[0] == pngs[1] != pngs[2]


# --- errors -----------------------------------------------------------------------------------


def test_no_pixel_data_for_sr() -> None:
    """An SR (no Pixel Data) raises NoPixelDataError."""
    with pytest.raises(NoPixelDataError, match="no Pixel Data"):
        to_png(factory.basic_text_sr())


def test_garbage_file_is_conversion_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A file that is not DICOM raises ConversionError, not a pydicom error."""
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(ConversionError, match="not a readable DICOM file"):
        convert_file(path)


def test_missing_file_is_conversion_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A vanished spool file raises ConversionError."""
    with pytest.raises(ConversionError, match="cannot read file"):
        convert_file(tmp_path / "absent.dcm")


def test_truncated_pixel_data_is_conversion_error() -> None:
    """Pixel Data shorter than Rows x Columns x 2 bytes raises ConversionError."""
    ds = _ct()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(ConversionError) as info:
        to_png(ds)
    assert type(info.value.__cause__).__module__.startswith(("pydicom", "builtins"))


def test_truncated_file_is_conversion_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A Part 10 file cut short in its pixel data raises ConversionError."""
    path = factory.write(_ct(), tmp_path / "ct.dcm")
    path.write_bytes(path.read_bytes()[:-100_000])
    with pytest.raises(ConversionError):
        convert_file(path)


def test_bad_bits_allocated_is_conversion_error() -> None:
    """Bits Allocated 12 is refused with a message naming it."""
    ds = _ct()
    ds.BitsAllocated = 12
    with pytest.raises(ConversionError, match="Bits Allocated 12"):
        to_png(ds)


def test_pixel_cap_is_enforced_before_decoding() -> None:
    """Rows x Columns x Frames above max_pixels is refused (decompression-bomb guard)."""
    ds = factory.mono_multiframe(frames=10, rows=64, columns=64)
    with pytest.raises(ConversionError, match="exceeds the cap"):
        to_png(ds, ConvertOptions(max_pixels=64 * 64 * 10 - 1))
    assert len(to_png(ds, ConvertOptions(max_pixels=64 * 64 * 10))) == 1


def test_unknown_transfer_syntax_is_conversion_error() -> None:
    """A transfer syntax without a decoder raises ConversionError naming it."""
    ds = _ct()
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9999.1"
    with pytest.raises(ConversionError, match=r"transfer syntax 1\.2\.826\.0\.1\.3680043\.9999\.1"):
        to_png(ds)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"frame_policy": "first"},
        {"frame_param": 0},
        {"size": -1},
        {"percentiles": (99.0, 1.0)},
        {"window_index": -1},
        {"max_pixels": 0},
    ],
)
def test_bad_options_fail_at_construction(kwargs: dict[str, object]) -> None:
    """Impossible options raise ConfigError when built, not per image."""
    with pytest.raises(ConfigError):
        ConvertOptions(**kwargs)  # type: ignore[arg-type]


# --- real files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compressed", "reference"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        ("emri_small_RLE.dcm", "emri_small.dcm"),
    ],
)
def test_lossless_compressed_files_match_uncompressed(compressed: str, reference: str) -> None:
    """RLE, JPEG-LS and JPEG 2000 lossless decode (pylibjpeg) to the uncompressed rendering."""
    options = ConvertOptions(size=0, frame_policy="all")
    assert to_png(pydicom.dcmread(get_testdata_file(compressed)), options) == to_png(
        pydicom.dcmread(get_testdata_file(reference)), options
    )


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("CT_small.dcm", "L"),
        ("MR_small.dcm", "L"),
        ("JPEG-LL.dcm", "L"),
        ("MR2_J2KI.dcm", "L"),
        ("US1_J2KR.dcm", "RGB"),
        ("SC_rgb_jpeg_dcmtk.dcm", "RGB"),
    ],
)
def test_real_files_convert(name: str, mode: str) -> None:
    """Real test files convert to a 512x512 PNG of the right mode with real contrast."""
    result = convert_file(get_testdata_file(name))
    assert isinstance(result, ConvertedImage)
    image = _png(result.pngs[0])
    assert (image.mode, image.size) == (mode, (512, 512))
    assert np.asarray(image).std() > 10


def test_real_monochrome1_is_inverted() -> None:
    """RG1 (MONOCHROME1 CR): the stored-high collimator corners render dark, lungs bright-ish."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    out = render_frame(ds, 0, NATIVE)
    stored = ds.pixel_array
    high = stored > np.percentile(stored, 95)
    low = stored < np.percentile(stored, 5)
    assert out[high].mean() < out[low].mean()
