"""Read a file, check a dataset can be decoded, then decode only the frames asked for.

Checks come first and are cheap (header only), so a decompression bomb or an unsupported
encoding is refused with a precise reason before any pixel is touched. Frames are decoded one at a
time, so a 1,000-frame cine sampled with ``middle`` costs one frame of memory, not a thousand.

Decoder per transfer syntax (:data:`PREFERRED_PLUGINS`), chosen by measurement (median CPU ms
per frame on this project's 2-core machine, ``python -m bench.convert_choices``; the GDCM column
was measured with python-gdcm installed for the purpose):

    syntax              image              pylibjpeg  pyjpegls  pillow   pydicom  (gdcm)
    JPEG baseline       US 480x640 RGB        6.8        -        3.1       -      7.6
    JPEG lossless SV1   CT 512x512            7.3        -         -        -      8.5
    JPEG lossless SV1   CR 1955x1841        120          -         -        -    110
    JPEG-LS lossless    CT 512x512           12.2       3.0        -        -      4.3
    JPEG-LS lossless    CR 1955x1841        287        77          -        -    152
    JPEG-LS lossless    US 480x640 RGB       30.8       6.0        -        -      7.5
    JPEG 2000 lossless  CT 512x512           15.8        -       16.8       -     12.5
    JPEG 2000 lossless  CR 1955x1841        454          -      462         -    323
    RLE                 CR 1955x1841          9.8        -         -      86.6    -

Pillow (libjpeg-turbo) also agrees with DCMTK on YBR_FULL_422 baseline JPEG (max |delta| 1,
99.99% equal) where pylibjpeg's chroma upsampling differs by up to 28 grey levels. pyjpegls is
4-5x faster than pylibjpeg on JPEG-LS. GDCM is ~30% faster on JPEG 2000 only, not enough to
prefer it anywhere; it is the fallback instead. The preferred plugin is tried first, then every
other available one (:data:`FALLBACK_PLUGINS`), GDCM last: it reads what DCMTK (IJG libjpeg)
reads, e.g. 12-bit JPEG whose SOS segment is off-standard, which pylibjpeg refuses. pydicom's
GDCM plugin refuses 12-bit JPEG Extended, so that one case calls GDCM directly. The plugin that
decoded is recorded; when all fail, the error names the syntax and ``detail`` lists each
plugin's own complaint.

A truncated file is a failure, not an object without pixels: pydicom reads one silently, so
:func:`read` compares where the last element ends with the end of the file.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from pipeline.convert import guards, palette
from pipeline.errors import ConversionError, NoPixelDataError
from pipeline.uids import is_safe_uid
from pipeline.vocabulary import modality_code

#: The three pixel data elements; an object with none of them (SR, KOS, PR) has no image.
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: Bits Allocated values pydicom can decode for integer Pixel Data.
SUPPORTED_BITS_ALLOCATED = (1, 8, 16, 32)

#: Photometric interpretations we render; anything else is refused with its name.
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOR = (
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "YBR_PARTIAL_420",
    "PALETTE COLOR",
)

#: pydicom decoding plugin tried first per transfer syntax (see the module docstring).
PREFERRED_PLUGINS: dict[str, str] = {
    JPEGBaseline8Bit: "pillow",
    JPEGExtended12Bit: "pylibjpeg",
    JPEGLossless: "pylibjpeg",
    JPEGLosslessSV1: "pylibjpeg",
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
    JPEG2000: "pylibjpeg",
    RLELossless: "pylibjpeg",
}

#: The plugins tried after the preferred one, in this order; a plugin pydicom knows and this
#: list does not comes before "gdcm", which is last: the fallback for streams the others refuse.
FALLBACK_PLUGINS = ("pylibjpeg", "pyjpegls", "pillow", "pydicom")
GDCM = "gdcm"

#: What :func:`decode_frame` reports for uncompressed Pixel Data (no plugin).
NATIVE = "native"

#: pydicom wraps a plugin's error in this sentence; the plugin's own words come after it.
_ALL_PLUGINS_FAILED = "Unable to decode as exceptions were raised by all available plugins:"

#: Native syntaxes whose Pixel Data is little-endian bytes in memory once the file is read.
NATIVE_LITTLE_ENDIAN = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
)

#: Every transfer syntax we decode: what the listener accepts in association negotiation.
DECODABLE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    *NATIVE_LITTLE_ENDIAN,
    ExplicitVRBigEndian,
    *PREFERRED_PLUGINS,
)

#: The Deflated syntax as it appears in a File Meta, and how far to look for it: (0002,0010)
#: comes a few hundred bytes into every Part 10 file.
_DEFLATED_UID = DeflatedExplicitVRLittleEndian.encode("ascii")
_META_PEEK = 4096

#: File Meta: 128-byte preamble, "DICM", then (0002,0000) UL is 12 bytes before its value counts.
_META_GROUP_START = 128 + 4 + 12

_READ_ERRORS = (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, AttributeError)

#: pydicom's warning when the file ends inside an undefined-length element (encapsulated Pixel
#: Data without its delimiter); it then drops the element and returns what it has.
_EOF_WARNING = "End of file reached"

#: An element's undefined length (0xFFFFFFFF): it ends at its delimiter, not at a known offset.
_UNDEFINED_LENGTH = 0xFFFFFFFF


def read(path: Path, max_decoded_bytes: int) -> Dataset:
    """``dcmread`` with a zip-bomb guard for Deflated files; every failure a ConversionError.

    The file is read in one call and parsed from memory (0.2 ms instead of 0.3 ms for a CT
    slice); the File Meta is parsed a second time only when it may name the Deflated syntax.
    A file cut short is refused as truncated (see :func:`_check_complete`), whatever pydicom made
    of it.
    """
    try:
        data = path.read_bytes()
        deflated = _DEFLATED_UID in data[:_META_PEEK] and _check_deflated(
            path, data, max_decoded_bytes
        )
    except _READ_ERRORS as exc:
        raise ConversionError(
            f"not a readable DICOM file ({type(exc).__name__})", detail=str(exc)
        ) from exc
    except OSError as exc:
        raise ConversionError(f"cannot read file: {exc.strerror or exc}") from exc
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data))
    except struct.error as exc:  # a 32-bit length cut short: pydicom does not catch this one
        raise ConversionError(
            "data set is truncated: the file ends inside an element header",
            detail=f"{type(exc).__name__}: {exc}",
        ) from exc
    except OSError as exc:  # pydicom: "No tag to read at file position ..." in a sequence
        raise ConversionError(
            "data set is truncated: the file ends inside a sequence", detail=str(exc)
        ) from exc
    except zlib.error as exc:
        raise ConversionError(f"Deflated data set is corrupt: {exc}") from exc
    except _READ_ERRORS as exc:
        raise ConversionError(
            f"not a readable DICOM file ({type(exc).__name__})", detail=str(exc)
        ) from exc
    for warning in caught:
        if _EOF_WARNING in str(warning.message):
            raise ConversionError(
                "data set is truncated: the file ends before the end of an "
                "undefined-length element (no delimiter)",
                detail=str(warning.message),
            )
        if issubclass(warning.category, ResourceWarning):
            # A finalizer's report on some other object that the garbage collector happened to
            # free during the read (a socket another thread leaked, say). Passed on from here it
            # would be blamed on this file, and under ``-W error`` fail its conversion.
            continue
        warnings.warn(warning.message, stacklevel=2)  # not ours to judge: pass it on
    if not deflated:  # a Deflated data set's offsets count inflated bytes, not the file's
        _check_complete(ds, len(data))
    return ds


def _check_deflated(path: Path, data: bytes, max_decoded_bytes: int) -> bool:
    """True for a Deflated file, once it is known to inflate within ``max_decoded_bytes``."""
    meta = pydicom.filereader.read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return False
    group_length = meta.get("FileMetaInformationGroupLength")
    if group_length is None:
        raise ConversionError("Deflated file without File Meta Group Length")
    offset = _META_GROUP_START + int(group_length)
    guards.check_inflated_size(memoryview(data)[offset:], max_decoded_bytes)
    return True


def _last_element(ds: Dataset) -> RawDataElement | None:
    """The element of ``ds`` read last (pydicom keeps them in file order), if still raw."""
    keys = ds.keys()
    if not keys:
        return None
    element: Any = ds.get_item(list(keys)[-1])  # get_item leaves a raw element raw
    return element if isinstance(element, RawDataElement) else None


def _check_complete(ds: Dataset, size: int) -> None:
    """Refuse a data set whose last element does not end exactly where the file does.

    pydicom stops quietly when fewer than 8 bytes (an element header) remain, and keeps a value
    cut short as it is, so a file truncated before or inside Pixel Data would otherwise read as
    an object without pixels. An undefined-length last element ended at its delimiter (pydicom
    warns when there is none, see :func:`read`).
    """
    meta = getattr(ds, "file_meta", None)
    last = _last_element(ds) if ds.keys() else _last_element(meta) if meta is not None else None
    if last is None or last.length == _UNDEFINED_LENGTH:
        return
    end = last.value_tell + last.length
    if end > size:
        raise ConversionError(
            f"data set is truncated: element {last.tag} declares {last.length} bytes, "
            f"the file holds {size - last.value_tell}"
        )
    if end < size:
        raise ConversionError(
            f"data set is truncated: the file ends inside an element header "
            f"({size - end} bytes after the last whole element)"
        )


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise ConversionError(f"missing {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{keyword} is not an integer") from exc


def has_pixel_data(ds: Dataset) -> bool:
    """True when ``ds`` carries one of the :data:`PIXEL_KEYWORDS` (an image to convert)."""
    return any(k in ds for k in PIXEL_KEYWORDS)


def frame_count(ds: Dataset) -> int:
    """Number of Frames (1 when absent or empty); ConversionError when below 1."""
    n = _int(ds, "NumberOfFrames", 1)
    if n < 1:
        raise ConversionError("Number of Frames is not a positive integer")
    return n


def photometric(ds: Dataset) -> str:
    """The Photometric Interpretation, stripped; MONOCHROME2 if absent and one sample."""
    value = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if not value and _int(ds, "SamplesPerPixel", 1) == 1:
        return "MONOCHROME2"
    return value


def frame_bytes(ds: Dataset) -> int:
    """Bytes one decoded frame occupies (1-bit data is unpacked to a byte per pixel)."""
    if "PixelData" in ds:
        sample = max(_int(ds, "BitsAllocated") // 8, 1)
    else:
        sample = 8 if "DoubleFloatPixelData" in ds else 4
    return _int(ds, "Rows") * _int(ds, "Columns") * _int(ds, "SamplesPerPixel", 1) * sample


def check(ds: Dataset, max_pixels: int, max_decoded_bytes: int, frames: int) -> Decoder | None:
    """Refuse what cannot be converted; return the decoder (None for float pixel data).

    ``frames`` is how many frames will be decoded: with ``max_decoded_bytes`` it bounds the
    work, while ``max_pixels`` bounds the object as a whole.
    """
    if not has_pixel_data(ds):
        sop_class = UID(str(ds.get("SOPClassUID", "") or "?"))
        if "Image Storage" in sop_class.name:
            raise ConversionError(
                f"{sop_class.name} object without Pixel Data: the data set is incomplete "
                "or truncated"
            )
        modality = modality_code(ds.get("Modality")) or "?"
        shown = sop_class if is_safe_uid(sop_class) else "?"
        raise NoPixelDataError(f"no Pixel Data (Modality {modality}, SOP Class {shown})")
    rows, columns, n = _int(ds, "Rows"), _int(ds, "Columns"), frame_count(ds)
    if rows < 1 or columns < 1:
        raise ConversionError(f"empty image: Rows {rows}, Columns {columns}")
    if rows * columns * n > max_pixels:
        raise ConversionError(
            f"image too large: {rows}x{columns}x{n} frames = {rows * columns * n} "
            f"pixels exceeds the cap of {max_pixels}"
        )
    pi = photometric(ds)
    if pi not in MONOCHROME + COLOR:
        shown = modality_code(pi) or "(malformed)"  # a CS, like Modality: never quote raw text
        raise ConversionError(f"unsupported Photometric Interpretation {shown}")
    if "PixelData" in ds:
        bits_allocated, bits_stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored", -1)
        if bits_allocated not in SUPPORTED_BITS_ALLOCATED:
            raise ConversionError(f"unsupported Bits Allocated {bits_allocated}")
        if bits_stored != -1 and not 1 <= bits_stored <= bits_allocated:
            raise ConversionError(
                f"Bits Stored {bits_stored} does not fit Bits Allocated {bits_allocated}"
            )
    decoded = frame_bytes(ds) * frames
    if decoded > max_decoded_bytes:
        raise ConversionError(
            f"decoding {frames} frame(s) of {rows}x{columns} needs {decoded} bytes, "
            f"over the cap of {max_decoded_bytes} (max_decoded_bytes)"
        )
    decoder = _decoder(ds) if "PixelData" in ds else None
    if decoder is None or not decoder.UID.is_encapsulated:
        _check_native_length(ds, rows * columns * n, n)
    return decoder


def _check_native_length(ds: Dataset, pixels: int, frames: int) -> None:
    """Refuse native pixel data shorter than the header says, or longer by a frame or more.

    Trailing bytes short of one frame are padding that real files carry (pydicom's own
    ``MR_small_padded.dcm``: 128 bytes; DCMTK and the PACS render it) and are ignored. A whole
    frame or more beyond the header means its Rows, Columns or Number of Frames are wrong, and
    rendering what the header says would embed something other than what was sent.
    """
    if "PixelData" in ds:
        keyword, bits = "PixelData", _int(ds, "BitsAllocated")
    else:
        keyword = "DoubleFloatPixelData" if "DoubleFloatPixelData" in ds else "FloatPixelData"
        bits = 64 if keyword == "DoubleFloatPixelData" else 32
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples == 3 and photometric(ds) == "YBR_FULL_422":
        samples = 2  # two Y per Cb and Cr (PS3.3 C.7.6.3.1.2)
    expected = (pixels * samples * bits + 7) // 8  # 1-bit: frames packed back to back
    actual = len(ds[keyword].value or b"")
    if actual < expected:
        raise ConversionError(
            f"Pixel Data is too short: {actual} bytes where the header needs {expected}"
        )
    if actual - expected >= max(expected // frames, 2):
        raise ConversionError(
            f"Pixel Data is too long: {actual} bytes where the header needs {expected} "
            "(a frame or more beyond Number of Frames)"
        )


def _decoder(ds: Dataset) -> Decoder:
    meta = getattr(ds, "file_meta", None)
    tsyntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if not tsyntax:
        raise ConversionError("no Transfer Syntax UID in the file meta")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise ConversionError(f"no decoder for transfer syntax {tsyntax} ({tsyntax.name})") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise ConversionError(
            f"no decoder available for transfer syntax {tsyntax} ({tsyntax.name}); "
            f"missing {missing}"
        )
    return decoder


def plugin_order(decoder: Decoder) -> list[str]:
    """The plugins to try for ``decoder``'s syntax, in order: preferred, the others, GDCM last."""
    available = decoder.available_plugins
    preferred = PREFERRED_PLUGINS.get(decoder.UID, "")
    order = [preferred, *FALLBACK_PLUGINS, *sorted(available), GDCM]
    return [p for p in dict.fromkeys(order) if p in available]


def _gdcm_direct(ds: Dataset, tsyntax: UID) -> bool:
    """True for the case pydicom's GDCM plugin refuses but GDCM reads: 12-bit grey JPEG."""
    return (
        tsyntax == JPEGExtended12Bit
        and _int(ds, "BitsAllocated") == 16
        and _int(ds, "BitsStored", 16) > 8
        and _int(ds, "SamplesPerPixel", 1) == 1
        and photometric(ds) in MONOCHROME
    )


def _gdcm_grey(ds: Dataset, frame: bytes) -> npt.NDArray[Any]:
    """Decode a grey 12-bit JPEG Extended frame with GDCM, as pydicom's GDCM plugin would.

    The values come back unmasked and unsigned (the JPEG samples' bit patterns); the caller
    masks Bits Stored and sign-extends.
    """
    import gdcm

    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    bits_stored = _int(ds, "BitsStored")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(frame)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((columns, rows, 1))
    image.SetDataElement(element)
    pi = gdcm.PhotometricInterpretation.GetPIType(photometric(ds))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi))
    ts = gdcm.TransferSyntax.GetTSType(str(JPEGExtended12Bit))
    image.SetTransferSyntax(gdcm.TransferSyntax(ts))
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits_stored, bits_stored - 1, 0))
    buffer = image.GetBuffer()  # None when GDCM cannot decode; its reasons go to stderr
    if not buffer:
        raise ValueError("GDCM could not decode the frame")
    data = buffer.encode("utf-8", "surrogateescape")  # GDCM hands char* over as str
    if len(data) != rows * columns * 2:
        raise ValueError(f"GDCM returned {len(data)} bytes instead of {rows * columns * 2}")
    kind = "i" if _int(ds, "PixelRepresentation", 0) == 1 else "u"
    return np.frombuffer(data, dtype=f"={kind}2").reshape(rows, columns)


def _plugin_error(exc: Exception) -> str:
    """A plugin's own complaint, on one line, without pydicom's wrapping sentence."""
    text = str(exc)
    if text.startswith(_ALL_PLUGINS_FAILED):
        text = text[len(_ALL_PLUGINS_FAILED) :].strip()
        name, sep, rest = text.partition(": ")
        text = rest if sep and " " not in name else text
    return " ".join(text.split()) or type(exc).__name__


def _as_array(ds: Dataset, decoder: Decoder, index: int) -> tuple[npt.NDArray[Any], int, str]:
    """Frame ``index`` of encapsulated data as (values, bits still to mask, plugin).

    Each plugin of :func:`plugin_order` is tried in turn; when none reads the stream the error
    names the syntax, and ``detail`` holds every plugin's own complaint.
    """
    tsyntax = decoder.UID
    frame = get_frame(ds.PixelData, index, number_of_frames=frame_count(ds))
    guards.check_codestream(frame, _int(ds, "Rows"), _int(ds, "Columns"), index)
    errors = []
    for plugin in plugin_order(decoder):
        try:
            if plugin == GDCM and _gdcm_direct(ds, tsyntax):
                return _gdcm_grey(ds, frame), _int(ds, "BitsStored"), GDCM
            # pydicom's default decoding options include as_rgb=True: YBR_* arrive as RGB.
            return decoder.as_array(ds, index=index, decoding_plugin=plugin)[0], 0, plugin
        except MemoryError:
            raise
        except Exception as exc:
            errors.append(f"{plugin}: {_plugin_error(exc)}")
    raise ConversionError(
        f"{tsyntax.name}: no decoder could read the stream",
        detail="; ".join(errors) or "no decoding plugin available",
    )


def _raw_native(ds: Dataset, decoder: Decoder, index: int) -> npt.NDArray[Any] | None:
    """A zero-copy view of frame ``index`` of little-endian native 8/16-bit grey data.

    pydicom's native decoder copies the frame to mask unused high bits; the grey lookup table
    masks for free, so the raw bit patterns are handed over instead (None: not this case).
    """
    if decoder.UID not in NATIVE_LITTLE_ENDIAN or photometric(ds) not in MONOCHROME:
        return None
    bits_allocated = _int(ds, "BitsAllocated")
    if bits_allocated not in (8, 16) or _int(ds, "SamplesPerPixel", 1) != 1:
        return None
    data = ds.PixelData
    count = _int(ds, "Rows") * _int(ds, "Columns")
    size = count * bits_allocated // 8
    if len(data) < size * frame_count(ds):
        return None  # let pydicom explain what is missing
    kind = "i" if _int(ds, "PixelRepresentation", 0) == 1 else "u"
    dtype = np.dtype(f"<{kind}{bits_allocated // 8}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=index * size)
    return flat.reshape(_int(ds, "Rows"), _int(ds, "Columns"))


def decode_frame(
    ds: Dataset, decoder: Decoder | None, index: int
) -> tuple[npt.NDArray[Any], int, str]:
    """Frame ``index`` as (values, bits_stored still to mask, 0 when done, plugin that decoded).

    Values are (rows, columns) grey or (rows, columns, 3) RGB. Little-endian native grey data
    comes back raw (see :func:`_raw_native`), as does GDCM's 12-bit JPEG; everything else
    through pydicom (:func:`plugin_order` for compressed data), which masks
    Bits Stored < Bits Allocated (sign-extending signed data), turns YBR_* into RGB and undoes
    the planar configuration; PALETTE COLOR goes through its palette here. pydicom warns about
    header/codestream mismatches it already corrects; they are not the operator's business, so
    they are silenced.
    """
    if decoder is not None:
        raw = _raw_native(ds, decoder, index)
        if raw is not None:
            return raw, _int(ds, "BitsStored", 0), NATIVE
    bits_stored, plugin = 0, NATIVE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if decoder is None:
            arr = ds.pixel_array
            arr = arr[index] if frame_count(ds) > 1 else arr
        elif decoder.UID.is_encapsulated:
            arr, bits_stored, plugin = _as_array(ds, decoder, index)
        else:
            arr = decoder.as_array(ds, index=index)[0]
        if photometric(ds) == "PALETTE COLOR":
            arr = palette.apply_palette(np.asarray(arr), ds)
    return np.asarray(arr), bits_stored, plugin
