"""Check a dataset can be decoded, then decode only the frames asked for.

Checks come first and are cheap (header only), so a decompression bomb or an unsupported
encoding is refused with a precise reason before any pixel is touched. Frames are decoded one at a
time through pydicom's decoder (pylibjpeg plugins for JPEG / JPEG-LS / JPEG 2000 / RLE), so a
1,000-frame cine sampled with ``middle`` costs one frame of memory, not a thousand.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import UID

from pipeline.errors import ConversionError, NoPixelDataError

#: The three pixel data elements; an object with none of them (SR, KOS, PR) has no image.
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: Bits Allocated values pydicom can decode for integer Pixel Data.
SUPPORTED_BITS_ALLOCATED = (1, 8, 16, 32)

#: Photometric interpretations we render; anything else (e.g. YBR_ICT left undecoded) is refused.
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


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise ConversionError(f"missing {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{keyword} is not an integer: {value!r}") from exc


def frame_count(ds: Dataset) -> int:
    """Number of Frames (1 when absent or empty)."""
    return max(_int(ds, "NumberOfFrames", 1), 1)


def photometric(ds: Dataset) -> str:
    """The Photometric Interpretation, stripped; MONOCHROME2 if absent and one sample."""
    value = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if not value and _int(ds, "SamplesPerPixel", 1) == 1:
        return "MONOCHROME2"
    return value


def check(ds: Dataset, max_pixels: int) -> Decoder | None:
    """Refuse what cannot be converted; return the decoder (None for float pixel data)."""
    if not any(k in ds for k in PIXEL_KEYWORDS):
        modality = str(ds.get("Modality", "") or "?")
        raise NoPixelDataError(
            f"no Pixel Data (Modality {modality}, SOP Class {ds.get('SOPClassUID', '?')})"
        )
    rows, columns, frames = _int(ds, "Rows"), _int(ds, "Columns"), frame_count(ds)
    if rows < 1 or columns < 1:
        raise ConversionError(f"empty image: Rows {rows}, Columns {columns}")
    if rows * columns * frames > max_pixels:
        raise ConversionError(
            f"image too large: {rows}x{columns}x{frames} frames = {rows * columns * frames} "
            f"pixels exceeds the cap of {max_pixels}"
        )
    pi = photometric(ds)
    if pi not in MONOCHROME + COLOR:
        raise ConversionError(f"unsupported Photometric Interpretation {pi!r}")
    if "PixelData" not in ds:
        return None
    bits_allocated, bits_stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored", -1)
    if bits_allocated not in SUPPORTED_BITS_ALLOCATED:
        raise ConversionError(f"unsupported Bits Allocated {bits_allocated}")
    if bits_stored != -1 and not 1 <= bits_stored <= bits_allocated:
        raise ConversionError(
            f"Bits Stored {bits_stored} does not fit Bits Allocated {bits_allocated}"
        )
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


def decode_frame(ds: Dataset, decoder: Decoder | None, index: int) -> npt.NDArray[Any]:
    """Frame ``index`` as stored values (rows, columns) or RGB (rows, columns, 3).

    YBR_* become RGB (pydicom's ``as_rgb``), planar configuration is undone by the decoder,
    PALETTE COLOR goes through its palette. pydicom warns about header/codestream mismatches it
    already corrects; they are not the operator's business, so they are silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if decoder is None:
            arr = ds.pixel_array
            arr = arr[index] if frame_count(ds) > 1 else arr
        else:
            # pydicom's default decoding options include as_rgb=True: YBR_* arrive as RGB.
            arr, _meta = decoder.as_array(ds, index=index)
        if photometric(ds) == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
            if arr.dtype.itemsize > 1:  # 16-bit palette entries -> their high byte
                arr = (arr >> 8).astype(np.uint8)
    return np.asarray(arr)
