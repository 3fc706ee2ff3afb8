"""Input policy: decoder fallback, pixel data sanity, truncated and incomplete data sets.

Every failure here is a ConversionError (the object is quarantined) whose message is one line an
operator can read and whose ``detail`` is for developers; neither quotes patient data.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels.decoders.base import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
)

from pipeline.convert import convert_file, decode, png, to_png
from pipeline.errors import ConversionError, NoPixelDataError
from tests import factory

DCMTK = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("dcmcjpeg", "dcmdjpeg", "dcmj2pnm")),
    reason="DCMTK dcmcjpeg/dcmdjpeg/dcmj2pnm not on PATH",
)

PHI = (
    factory.PATIENT_NAME,
    factory.PATIENT_ID,
    factory.PATIENT_BIRTH_DATE,
    factory.ACCESSION_NUMBER,
)

JPEG_EXTENDED = "JPEG Extended (Process 2 and 4)"  # JPEGExtended12Bit.name


def _assert_reason(exc: ConversionError) -> None:
    """One line each, and no patient data in the reason or the detail."""
    reason, detail = str(exc), exc.detail
    assert "\n" not in reason and "\n" not in detail
    assert not [value for value in PHI if value in reason or value in detail]


def _ct(transfer_syntax: str = ExplicitVRLittleEndian) -> pydicom.Dataset:
    """A 64x64 CT slice (8192 bytes of Pixel Data) carrying the factory's patient data."""
    return factory.ct_slice(
        study_uid=factory.new_uid(),
        series_uid=factory.new_uid(),
        instance_number=1,
        rows=64,
        columns=64,
        transfer_syntax=transfer_syntax,
    )


# --- a 12-bit JPEG Extended stream that pylibjpeg refuses and DCMTK reads --------------------


def _segments(frame: bytes | bytearray) -> dict[int, int]:
    """Offset of the first JPEG marker segment of each kind, up to and including SOS."""
    found: dict[int, int] = {}
    pos = 2
    while pos + 4 <= len(frame):
        marker = frame[pos + 1]
        found.setdefault(marker, pos)
        if marker == 0xDA:
            break
        pos += 2 + struct.unpack(">H", frame[pos + 2 : pos + 4])[0]
    return found


def _jpeg_12bit(tmp_path: Path, damage: Callable[[bytearray], None]) -> Path:
    """A 12-bit MONOCHROME1 CR compressed by DCMTK (``dcmcjpeg +ee``), then ``damage``d."""
    source = factory.write(factory.mono1_cr(rows=128, columns=96, bits_stored=12), tmp_path / "a")
    compressed = tmp_path / "cr_ee.dcm"
    subprocess.run(["dcmcjpeg", "+ee", str(source), str(compressed)], check=True)
    ds = pydicom.dcmread(compressed)
    assert ds.file_meta.TransferSyntaxUID == JPEGExtended12Bit and ds.BitsStored == 12
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    damage(frame)
    ds.PixelData = encapsulate([bytes(frame)])
    return factory.write(ds, tmp_path / "damaged.dcm")


def _sequential_scan_ends_at_dc(frame: bytearray) -> None:
    """SOS spectral selection end 0 instead of 63: the defect of pydicom's JPEG-lossy.dcm.

    IJG libjpeg (DCMTK, GDCM) warns "Invalid SOS parameters for sequential JPEG" and decodes;
    pylibjpeg stops at "A misplaced marker segment was found".
    """
    sos = _segments(frame)[0xDA]
    components = frame[sos + 4]
    frame[sos + 5 + 2 * components + 1] = 0  # Ss, *Se*, Ah/Al


def _bogus_huffman_table(frame: bytearray) -> None:
    """Huffman code counts summing past 256: fatal for every JPEG decoder, DCMTK's included."""
    dht = _segments(frame)[0xC4]
    frame[dht + 5 : dht + 21] = b"\xff" * 16


def _shipped_jpeg_lossy(tmp_path: Path) -> Path:
    return Path(str(get_testdata_file("JPEG-lossy.dcm")))


def _dcmcjpeg_with_bad_sos(tmp_path: Path) -> Path:
    return _jpeg_12bit(tmp_path, _sequential_scan_ends_at_dc)


@DCMTK
@pytest.mark.parametrize("build", [_shipped_jpeg_lossy, _dcmcjpeg_with_bad_sos])
def test_off_standard_12bit_jpeg_falls_back_and_matches_dcmtk(
    tmp_path: Path, build: Callable[[Path], Path]
) -> None:
    """A 12-bit JPEG pylibjpeg refuses but DCMTK reads converts via GDCM, to DCMTK's pixels."""
    path = build(tmp_path)
    ds = pydicom.dcmread(path)
    preferred = decode.PREFERRED_PLUGINS[JPEGExtended12Bit]
    with pytest.raises(RuntimeError, match="misplaced marker"):
        get_decoder(JPEGExtended12Bit).as_array(ds, index=0, decoding_plugin=preferred)
    dcmtk = subprocess.run(
        ["dcmj2pnm", str(path), str(tmp_path / "dcmtk.pgm")], capture_output=True, text=True
    )
    assert dcmtk.returncode == 0 and "Invalid SOS parameters" in dcmtk.stdout + dcmtk.stderr

    result = convert_file(path)
    assert (len(result.pngs), result.decoder) == (1, "gdcm")

    subprocess.run(["dcmdjpeg", str(path), str(tmp_path / "dj.dcm")], check=True)
    reference = pydicom.dcmread(tmp_path / "dj.dcm").pixel_array
    stored, bits, plugin = decode.decode_frame(ds, decode.check(ds, 10**9, 10**9, 1), 0)
    assert plugin == "gdcm" and np.array_equal(stored & ((1 << bits) - 1), reference)


@DCMTK
def test_stream_no_decoder_reads_names_the_syntax_and_each_error(tmp_path: Path) -> None:
    """Every decoder failing: a one-line reason naming the syntax, each plugin's error in detail."""
    path = _jpeg_12bit(tmp_path, _bogus_huffman_table)
    dcmtk = subprocess.run(["dcmj2pnm", str(path), str(tmp_path / "x.pgm")], capture_output=True)
    assert dcmtk.returncode != 0  # DCMTK cannot read it either: nothing was given up too early
    with pytest.raises(ConversionError) as info:
        convert_file(path)
    assert str(info.value) == f"{JPEG_EXTENDED}: no decoder could read the stream"
    plugins = [part.split(": ", 1)[0] for part in info.value.detail.split("; ")]
    assert plugins == ["pylibjpeg", "pillow", "gdcm"]
    assert "huffman" in info.value.detail.lower()
    _assert_reason(info.value)


def test_plugins_are_tried_preferred_first_and_gdcm_last() -> None:
    """Preferred plugin first, every other available one next, GDCM (the fallback) last."""
    assert decode.plugin_order(get_decoder(JPEGExtended12Bit)) == ["pylibjpeg", "pillow", "gdcm"]
    assert decode.plugin_order(get_decoder(JPEGLSLossless)) == ["pyjpegls", "pylibjpeg", "gdcm"]
    assert decode.plugin_order(get_decoder(RLELossless)) == ["pylibjpeg", "pydicom"]


@pytest.mark.parametrize(
    ("syntax", "plugin"),
    [
        (ExplicitVRLittleEndian, "native"),
        (RLELossless, "pylibjpeg"),
        (JPEGLSLossless, "pyjpegls"),
    ],
)
def test_converted_image_records_the_decoder(tmp_path: Path, syntax: str, plugin: str) -> None:
    """ConvertedImage.decoder names the plugin that decoded ("native" when uncompressed)."""
    assert convert_file(factory.write(_ct(syntax), tmp_path / "ct.dcm")).decoder == plugin


def test_unexpected_failure_is_a_short_reason_with_detail(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unforeseen exception becomes a short reason; its text goes to detail, on one line."""

    def broken(*_args: object) -> bytes:
        raise ValueError("encoder\nexploded")

    monkeypatch.setattr(png, "encode", broken)
    with pytest.raises(ConversionError) as info:
        to_png(_ct())
    assert str(info.value) == "cannot convert pixel data (unexpected ValueError, see detail)"
    assert info.value.detail == "ValueError: encoder exploded"


# --- native Pixel Data length and Number of Frames ------------------------------------------


def test_native_pixel_data_longer_than_the_header_by_a_frame_is_refused() -> None:
    """Trailing padding short of a frame is ignored (real files carry it); a whole frame or more
    beyond the header means the header is wrong, and is refused."""
    pixels = np.arange(9, dtype=np.uint8).reshape(3, 3)  # 9 bytes: one pad byte is legal
    ds = factory.gray_image(pixels, window=(4.0, 9.0))
    assert len(ds.PixelData) == 10 and len(to_png(ds)) == 1
    ds.PixelData = pixels.tobytes() + b"\0" * 3
    assert len(to_png(ds)) == 1
    ds.PixelData = pixels.tobytes() * 2
    with pytest.raises(ConversionError, match=r"^Pixel Data is too long: 18 bytes where"):
        to_png(ds)
    ct = _ct()
    ct.PixelData += b"\0" * 128  # as in pydicom's MR_small_padded.dcm
    assert len(to_png(ct)) == 1
    ct.PixelData += ct.PixelData
    with pytest.raises(ConversionError, match="too long: 16640 bytes where the header needs 8192"):
        to_png(ct)


def test_native_pixel_data_short_of_the_header_is_refused_with_counts() -> None:
    """Native Pixel Data shorter than Rows x Columns x Samples x Bits x Frames names both counts."""
    ds = factory.mono_multiframe(frames=10, rows=8, columns=8)
    ds.PixelData = ds.PixelData[: 9 * 64]  # the last frame is missing
    with pytest.raises(ConversionError, match=r"^Pixel Data is too short: 576 bytes") as info:
        to_png(ds)
    assert str(info.value).endswith("where the header needs 640")
    _assert_reason(info.value)


def test_one_bit_pixel_data_is_counted_packed() -> None:
    """1-bit Pixel Data is checked as packed bits: 5x5x3 frames = 75 bits = 10 bytes."""
    ds = factory.gray_image(np.ones((3, 5, 5), bool))
    assert len(ds.PixelData) == 10 and len(to_png(ds)) == 1
    ds.PixelData += b"\0" * 4  # a whole frame (25 bits, 4 bytes) more than three frames
    with pytest.raises(ConversionError, match="too long: 14 bytes where the header needs 10"):
        to_png(ds)
    ds.PixelData = ds.PixelData[:9]
    with pytest.raises(ConversionError, match="too short: 9 bytes where the header needs 10"):
        to_png(ds)


@pytest.mark.parametrize("frames", [-5, 0])
def test_nonsense_number_of_frames_is_refused(frames: int) -> None:
    """Number of Frames below 1 is a ConversionError, not silently one frame."""
    ds = factory.gray_image(np.zeros((8, 8), np.uint8), window=(128.0, 256.0))
    ds.NumberOfFrames = frames
    with pytest.raises(ConversionError, match=r"^Number of Frames is not a positive integer$"):
        to_png(ds)


# --- truncated files and image objects without pixels ---------------------------------------


def _pixel_tag(data: bytes) -> int:
    return data.rindex(b"\xe0\x7f\x10\x00")


def _cut(at: Callable[[bytes], int]) -> Callable[[Path], Path]:
    def build(tmp_path: Path) -> Path:
        path = factory.write(_ct(), tmp_path / "ct.dcm")
        data = path.read_bytes()
        path.write_bytes(data[: at(data)])
        return path

    return build


def _cut_encapsulated(tmp_path: Path) -> Path:
    path = factory.write(_ct(transfer_syntax=RLELossless), tmp_path / "rle.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: (_pixel_tag(data) + len(data)) // 2])
    return path


def _cut_in_sequence(tmp_path: Path) -> Path:
    ds = _ct()
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X1", "99LOCAL", "Chest"
    item.is_undefined_length_sequence_item = True
    ds.RequestAttributesSequence = Sequence([item])  # (0040,0275), before Pixel Data
    ds["RequestAttributesSequence"].is_undefined_length = True
    path = factory.write(ds, tmp_path / "sq.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"99LOCAL")])
    return path


def _cut_deflated(tmp_path: Path) -> Path:
    ds = _ct()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = factory.write(ds, tmp_path / "deflated.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    return path


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(_cut(lambda d: len(d) - 100), id="inside-pixel-data"),
        pytest.param(_cut(lambda d: _pixel_tag(d) + 6), id="inside-pixel-data-tag-and-vr"),
        pytest.param(_cut(lambda d: _pixel_tag(d) + 10), id="inside-pixel-data-length"),
        pytest.param(_cut(lambda d: _pixel_tag(d) - 3), id="inside-the-element-before"),
        pytest.param(_cut_encapsulated, id="inside-encapsulated-fragments"),
        pytest.param(_cut_in_sequence, id="inside-undefined-length-sequence"),
        pytest.param(_cut_deflated, id="inside-deflated-stream"),
    ],
)
def test_truncated_file_fails_as_truncated(tmp_path: Path, build: Callable[[Path], Path]) -> None:
    """A file cut short anywhere fails as "data set is truncated", never skipped or escaping."""
    with pytest.raises(ConversionError, match=r"^data set is truncated: ") as info:
        convert_file(build(tmp_path))
    _assert_reason(info.value)


def test_image_object_without_pixel_data_fails_but_sr_is_skipped(tmp_path: Path) -> None:
    """No Pixel Data: a CT Image Storage object fails (cut at an element), an SR stays skipped."""
    path = _cut(_pixel_tag)(tmp_path)  # ends cleanly right before (7FE0,0010)
    with pytest.raises(
        ConversionError, match=r"^CT Image Storage object without Pixel Data: the data set is"
    ) as info:
        convert_file(path)
    _assert_reason(info.value)
    with pytest.raises(NoPixelDataError):
        to_png(factory.basic_text_sr())


def test_complete_files_still_read(tmp_path: Path) -> None:
    """The truncation check passes whole files: native, encapsulated, Deflated, with sequences."""
    for name in ("JPGExtended.dcm", "image_dfl.dcm", "MR_small_RLE.dcm", "rtplan.dcm"):
        decode.read(Path(str(get_testdata_file(name))), 1 << 30)
    path = factory.write(_ct(), tmp_path / "padded.dcm")
    path.write_bytes(path.read_bytes() + b"\0\0")  # two stray bytes: not a whole element
    with pytest.raises(ConversionError, match="truncated: the file ends inside an element header"):
        decode.read(path, 1 << 30)


def test_a_finalizer_warning_during_the_read_is_not_blamed_on_the_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Warnings raised while a file is parsed are passed on, except ResourceWarnings: those are
    finalizers reporting on other objects the garbage collector freed meanwhile (CI once failed
    a conversion under ``-W error`` over a socket another test had leaked)."""
    read = pydicom.dcmread

    def read_while_something_else_is_collected(*args: object, **kwargs: object) -> object:
        warnings.warn("unclosed <socket.socket fd=13>", ResourceWarning, stacklevel=1)
        warnings.warn("an odd value in the data set", UserWarning, stacklevel=1)
        return read(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", read_while_something_else_is_collected)
    with pytest.warns(UserWarning, match="an odd value") as passed_on:
        ds = decode.read(Path(str(get_testdata_file("CT_small.dcm"))), 1 << 30)
    assert ds.Modality == "CT"
    assert [w.category for w in passed_on] == [UserWarning]
