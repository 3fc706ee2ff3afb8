"""DICOM image -> the 8-bit 512x512 PNG input of MedImageInsight (DESIGN.md §4).

Public API::

    ConvertOptions, ConvertedImage           options in, result out (frozen, picklable)
    to_png(ds, options) -> list[bytes]       one PNG per selected frame
    convert_file(path, options)              dcmread + to_png + non-PHI header fields

Stages, one module each: ``decode`` (checks, frame decoding), ``header`` (Modality LUT / VOI of a
frame), ``pixels`` (pure numpy grey pipeline), ``png`` (resize + encode), ``options``.
Every failure leaves as :class:`ConversionError` (or :class:`NoPixelDataError`), so the caller
quarantines with a readable reason; no pydicom/numpy/Pillow exception escapes.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import Decoder

from pipeline.convert import decode, header, pixels, png
from pipeline.convert.options import ConvertedImage, ConvertOptions, select_frames
from pipeline.errors import ConversionError, PacsEmbedError

__all__ = ["ConvertOptions", "ConvertedImage", "convert_file", "render_frame", "to_png"]

_DEFAULT_OPTIONS = ConvertOptions()


def render_frame(
    ds: Dataset, frame: int, options: ConvertOptions = _DEFAULT_OPTIONS
) -> npt.NDArray[np.uint8]:
    """Frame ``frame`` of ``ds`` as an 8-bit array at native size (grey 2-D or RGB 3-D).

    Exposed so tests and the DCMTK comparison see the pixels before resizing and PNG encoding.
    """
    decoder = decode.check(ds, options.max_pixels)
    return _render(ds, decoder, frame, options)


def _render(
    ds: Dataset, decoder: Decoder | None, frame: int, options: ConvertOptions
) -> npt.NDArray[np.uint8]:
    arr = decode.decode_frame(ds, decoder, frame)
    if arr.ndim == 3:
        return pixels.color_to_u8(arr, int(ds.get("BitsStored", 8) or 8))
    if arr.ndim != 2:
        raise ConversionError(f"frame {frame} decoded to an unexpected shape {arr.shape}")
    return pixels.gray_to_u8(
        arr,
        header.modality_of(ds, frame),
        header.voi_of(ds, frame, options.window_index),
        header.is_monochrome1(ds),
        options.percentiles,
    )


def to_png(ds: Dataset, options: ConvertOptions = _DEFAULT_OPTIONS) -> list[bytes]:
    """PNG bytes, one per frame chosen by ``options.frame_policy``.

    Raises NoPixelDataError for objects without an image, ConversionError for anything that
    cannot be decoded or rendered.
    """
    try:
        decoder = decode.check(ds, options.max_pixels)
        frames = select_frames(decode.frame_count(ds), options.frame_policy, options.frame_param)
        return [png.encode(_render(ds, decoder, f, options), options.size) for f in frames]
    except PacsEmbedError:
        raise
    except MemoryError:
        raise  # not this object's fault: let the pool see it and retry later
    except Exception as exc:
        raise ConversionError(f"cannot convert pixel data: {type(exc).__name__}: {exc}") from exc


def _str(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def convert_file(
    path: str | os.PathLike[str], options: ConvertOptions = _DEFAULT_OPTIONS
) -> ConvertedImage:
    """Read a DICOM file and convert it; top-level so a ProcessPoolExecutor can pickle it.

    Only UIDs, SOP Class, Modality and Body Part Examined are copied out: no patient data.
    """
    try:
        ds = pydicom.dcmread(os.fspath(path))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConversionError(f"not a readable DICOM file: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise ConversionError(f"cannot read file: {exc.strerror or exc}") from exc
    sop_instance_uid = _str(ds, "SOPInstanceUID")
    if not sop_instance_uid:
        raise ConversionError("no SOP Instance UID")
    frames = select_frames(decode.frame_count(ds), options.frame_policy, options.frame_param)
    pngs = to_png(ds, options)
    return ConvertedImage(
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=_str(ds, "StudyInstanceUID"),
        series_instance_uid=_str(ds, "SeriesInstanceUID"),
        sop_class_uid=_str(ds, "SOPClassUID"),
        modality=_str(ds, "Modality"),
        body_part=_str(ds, "BodyPartExamined"),
        frames=tuple(frames),
        pngs=tuple(pngs),
    )
