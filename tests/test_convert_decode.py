"""Decoding: every transfer syntax to the same pixels, plugin choice, bits, palettes, guards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
)

from pipeline.convert import ConvertOptions, convert_file, decode, guards, png, render_frame, to_png
from pipeline.errors import ConversionError
from tests import factory

NATIVE = ConvertOptions(size=0)


def _render(name: str, frame: int = 0) -> np.ndarray:
    return render_frame(pydicom.dcmread(get_testdata_file(name)), frame, NATIVE)


@pytest.mark.parametrize(
    ("variant", "original"),
    [
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("MR_small_implicit.dcm", "MR_small.dcm"),
        ("emri_small_big_endian.dcm", "emri_small.dcm"),
        ("OBXXXX1A_expb.dcm", "OBXXXX1A.dcm"),
        ("gdcm-US-ALOKA-16_big.dcm", "gdcm-US-ALOKA-16.dcm"),
        ("SC_rgb_expb_16bit.dcm", "SC_rgb_16bit.dcm"),
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),
        ("SC_rgb_rle_32bit.dcm", "SC_rgb_32bit.dcm"),
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
    ],
)
def test_encodings_of_one_image_render_identically(variant: str, original: str) -> None:
    """Byte order, VR encoding and lossless compression never change the rendered pixels."""
    assert np.array_equal(_render(variant, 0), _render(original, 0))


def test_big_endian_palette_is_read_in_its_byte_order() -> None:
    """A big-endian 16-bit palette gives real colours (pydicom 3.0 alone scrambles it)."""
    image = _render("OBXXXX1A_expb.dcm")
    assert image.shape == (600, 800, 3) and image.max() > 200


def test_rgb_32bit_keeps_the_high_byte() -> None:
    """32-bit RGB samples become their top 8 bits, so the image keeps its contrast."""
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_32bit.dcm"))
    expected = (ds.pixel_array >> 24).astype(np.uint8)
    assert np.array_equal(render_frame(ds, 0, NATIVE), expected) and expected.max() == 255


def test_ybr_ict_lossy_j2k_is_rgb() -> None:
    """YBR_ICT JPEG 2000 comes out as RGB close to the uncompressed RGB original."""
    diff = np.abs(_render("US1_J2KI.dcm").astype(int) - _render("US1_UNCR.dcm"))
    assert diff.mean() < 2.0  # still YCbCr would be off by tens everywhere


def test_ybr_full_422_jpeg_matches_the_rgb_original() -> None:
    """YBR_FULL_422 baseline JPEG (dcmtk +eb+cy+s2) renders close to the RGB original."""
    diff = np.abs(_render("SC_rgb_dcmtk_+eb+cy+s2.dcm").astype(int) - _render("SC_rgb.dcm"))
    assert diff.mean() < 3.0


def test_one_bit_pixels_become_black_and_white() -> None:
    """Bits Allocated 1 (a segmentation) renders as 0 and 255 only."""
    image = _render("liver_1frame.dcm")
    assert set(np.unique(image).tolist()) == {0, 255}


@pytest.mark.parametrize("signed", [False, True])
def test_junk_high_bits_are_masked(signed: bool) -> None:
    """Bits above Bits Stored are ignored (and the sign taken from bit 11), raw path included."""
    values = np.arange(-2048, 2048) if signed else np.arange(4096)
    pix = values.reshape(64, 64).astype(np.int16 if signed else np.uint16)
    clean = factory.gray_image(pix, bits_stored=12, window=(100.0, 1500.0))
    dirty = factory.gray_image(pix, bits_stored=12, window=(100.0, 1500.0))
    dirty.PixelData = ((pix.view(np.uint16) & 0x0FFF) | 0xB000).astype("<u2").tobytes()
    assert np.array_equal(render_frame(dirty, 0, NATIVE), render_frame(clean, 0, NATIVE))
    assert decode.decode_frame(dirty, decode.check(dirty, 10**9, 10**9, 1), 0)[1] == 12


def test_raw_native_path_equals_pydicom_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero-copy path for native grey data renders exactly what pydicom's decoder gives."""
    ds = pydicom.dcmread(get_testdata_file("693_UNCR.dcm"))
    decoder = decode.check(ds, 10**9, 10**9, 1)
    assert decoder is not None and decode._raw_native(ds, decoder, 0) is not None  # path taken
    fast = render_frame(ds, 0, NATIVE)
    monkeypatch.setattr(decode, "_raw_native", lambda *_args: None)
    assert np.array_equal(render_frame(ds, 0, NATIVE), fast)


def test_preferred_plugin_falls_back_to_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the preferred plugin fails (Pillow on 12-bit JPEG), another one decodes the frame."""
    expected = _render("JPGExtended.dcm")
    monkeypatch.setitem(decode.PREFERRED_PLUGINS, JPEGExtended12Bit, "pillow")
    assert np.array_equal(_render("JPGExtended.dcm"), expected)


def test_jpeg_ls_uses_pyjpegls() -> None:
    """JPEG-LS prefers pyjpegls (4-5x faster than pylibjpeg), and it is installed."""
    assert decode.PREFERRED_PLUGINS[JPEGLSLossless] == "pyjpegls"
    decoder = decode.check(
        pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")), 10**9, 10**9, 1
    )
    assert decoder is not None and "pyjpegls" in decoder.available_plugins


def test_corrupt_rle_is_conversion_error() -> None:
    """RLE data cut in half raises ConversionError, not a plugin exception."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(ConversionError):
        to_png(ds)


# --- decompression bombs and caps ----------------------------------------------------------


def test_codestream_larger_than_header_is_refused() -> None:
    """A JPEG 2000 frame declaring more pixels than Rows x Columns is refused before decoding."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.Rows = ds.Columns = 16
    with pytest.raises(ConversionError, match="codestream declares 64x64"):
        to_png(ds)


def test_codestream_shape_of_jpeg_and_j2k() -> None:
    """SOF (JPEG, JPEG-LS) and SIZ (JPEG 2000) markers give the frame's rows and columns."""
    for name, shape in [("JPEG-LL.dcm", (1024, 256)), ("MR_small_jp2klossless.dcm", (64, 64))]:
        ds = pydicom.dcmread(get_testdata_file(name))
        frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
        assert guards.codestream_shape(frame) == shape
    assert guards.codestream_shape(b"\x00" * 32) is None


def test_decoded_bytes_cap_counts_only_selected_frames() -> None:
    """max_decoded_bytes bounds the frames actually decoded: all 10 refused, the middle one not."""
    ds = factory.mono_multiframe(frames=10, rows=64, columns=64)
    with pytest.raises(ConversionError, match="max_decoded_bytes"):
        to_png(ds, ConvertOptions(frame_policy="all", max_decoded_bytes=64 * 64 * 9))
    assert len(to_png(ds, ConvertOptions(frame_policy="middle", max_decoded_bytes=64 * 64))) == 1


def _deflated(tmp_path: Path, zeros: int) -> Path:
    ds = factory.gray_image(np.zeros((zeros // 1000, 1000), np.uint8), window=(128.0, 256.0))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return factory.write(ds, tmp_path / "deflated.dcm")


def test_deflate_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    """A Deflated file inflating past max_decoded_bytes is refused; a small one converts."""
    path = _deflated(tmp_path, 4_000_000)
    assert path.stat().st_size < 50_000
    with pytest.raises(ConversionError, match="inflates to more than"):
        convert_file(path, ConvertOptions(max_decoded_bytes=1_000_000))
    assert len(convert_file(path, ConvertOptions(max_decoded_bytes=8_000_000)).pngs) == 1


def test_corrupt_deflate_is_conversion_error(tmp_path: Path) -> None:
    """Garbage after a Deflated file's meta is a ConversionError naming zlib's complaint."""
    path = _deflated(tmp_path, 10_000)
    meta_end = 144 + int(
        pydicom.filereader.read_file_meta_info(path).FileMetaInformationGroupLength
    )
    path.write_bytes(path.read_bytes()[:meta_end] + b"\xff" * 200)
    with pytest.raises(ConversionError, match=r"corrupt|not a readable"):
        convert_file(path)


# --- PNG ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 53), (37, 53, 3)])
def test_png_round_trips_losslessly(shape: tuple[int, ...]) -> None:
    """The measured zlib settings (Z_RLE grey, level 3 colour) still give lossless PNGs."""
    image = np.random.default_rng(3).integers(0, 256, shape).astype(np.uint8)
    with Image.open(io.BytesIO(png.encode(image, 0))) as decoded:
        assert np.array_equal(np.asarray(decoded), image)


def test_rle_syntax_prefers_pylibjpeg() -> None:
    """RLE decodes with pylibjpeg-rle (9x faster than pydicom's decoder on a large CR)."""
    assert decode.PREFERRED_PLUGINS[RLELossless] == "pylibjpeg"
    decoder = decode.check(pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm")), 10**9, 10**9, 1)
    assert decoder is not None and "pylibjpeg" in decoder.available_plugins


def test_real_deflated_file_converts() -> None:
    """A real Deflated Explicit VR file passes the inflate guard and converts to one PNG."""
    result = convert_file(get_testdata_file("image_dfl.dcm"))
    assert len(result.pngs) == 1 and len(result.pngs[0]) > 1000
