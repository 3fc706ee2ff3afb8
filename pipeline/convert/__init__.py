"""DICOM image -> the 8-bit 512x512 PNG input of MedImageInsight (docs/architecture.md §8).

Public API::

    ConvertOptions, ModalityRule, ConvertedImage   options in, result out (frozen, picklable)
    convert_file(path, options)                    read + sample + to_png + a record per frame
    to_png(ds, options) -> list[bytes]             one PNG per selected frame
    render_frame(ds, frame, options)               one frame as 8 bits, before resize/PNG
    to_u8(ds, stored, frame, options)              the grey/colour stage alone (for the bench)

Stages, one module each: ``decode`` (read, checks, frame decoding), ``guards`` (bomb checks),
``palette`` (PALETTE COLOR), ``header`` (Modality LUT / VOI of a frame), ``pixels`` (pure numpy
grey pipeline), ``png`` (resize + encode), ``options`` (options, frame and series sampling).
Per-modality rules are resolved once per object (:meth:`ConvertOptions.for_modality`). Failures
leave as :class:`ConversionError`; objects deliberately not embedded as :class:`SkippedError`
(no pixel data, not sampled); no pydicom/numpy/Pillow exception escapes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import Decoder

from pipeline.convert import decode, fields, header, pixels, png
from pipeline.convert.options import (
    ConvertedImage,
    ConvertOptions,
    ModalityRule,
    select_frames,
    series_skip_reason,
)
from pipeline.errors import ConversionError, NotSampledError, PacsEmbedError

DECODABLE_TRANSFER_SYNTAXES = decode.DECODABLE_TRANSFER_SYNTAXES

__all__ = [
    "DECODABLE_TRANSFER_SYNTAXES",
    "ConvertOptions",
    "ConvertedImage",
    "ModalityRule",
    "convert_file",
    "render_frame",
    "to_png",
    "to_u8",
]

_DEFAULT_OPTIONS = ConvertOptions()


def _str(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _resolve(ds: Dataset, options: ConvertOptions) -> ConvertOptions:
    return options.for_modality(_str(ds, "Modality"))


def to_u8(
    ds: Dataset,
    stored: npt.NDArray[Any],
    frame: int,
    options: ConvertOptions,
    bits_stored: int = 0,
) -> npt.NDArray[np.uint8]:
    """Decoded frame -> 8 bits: Modality LUT, VOI (header, else preset, else percentiles), polarity.

    ``options`` must already be resolved for the object's modality; ``bits_stored`` is what
    :func:`decode.decode_frame` says is still to be masked.
    """
    if stored.ndim == 3:
        return pixels.color_to_u8(stored, int(ds.get("BitsStored", 8) or 8))
    if stored.ndim != 2:
        raise ConversionError(f"frame {frame} decoded to an unexpected shape {stored.shape}")
    voi = header.voi_of(ds, frame, options.window_index, options.window_explanation)
    if voi is None and options.preset_window is not None:
        voi = pixels.Window(*options.preset_window)
    return pixels.gray_to_u8(
        stored,
        header.modality_of(ds, frame),
        voi,
        header.is_monochrome1(ds),
        options.percentiles,
        bits_stored,
    )


def _render(
    ds: Dataset, decoder: Decoder | None, frame: int, options: ConvertOptions
) -> tuple[npt.NDArray[np.uint8], str]:
    stored, bits_stored, plugin = decode.decode_frame(ds, decoder, frame)
    return to_u8(ds, stored, frame, options, bits_stored), plugin


def render_frame(
    ds: Dataset, frame: int, options: ConvertOptions = _DEFAULT_OPTIONS
) -> npt.NDArray[np.uint8]:
    """Frame ``frame`` of ``ds`` as an 8-bit array at native size (grey 2-D or RGB 3-D).

    Exposed so tests and the DCMTK comparison see the pixels before resizing and PNG encoding.
    """
    options = _resolve(ds, options)
    decoder = decode.check(ds, options.max_pixels, options.max_decoded_bytes, 1)
    return _render(ds, decoder, frame, options)[0]


def _frames_and_pngs(ds: Dataset, options: ConvertOptions) -> tuple[list[int], list[bytes], str]:
    """The selected frames, their PNGs and the plugin(s) that decoded them; ``options`` already
    resolved for the object's modality.

    Every unexpected failure becomes a ConversionError: a short reason, the exception's text
    in ``detail``.
    """
    try:
        frames = select_frames(decode.frame_count(ds), options.frame_policy, options.frame_param)
        decoder = decode.check(ds, options.max_pixels, options.max_decoded_bytes, len(frames))
        pngs: list[bytes] = []
        plugins: list[str] = []
        for f in frames:
            image, plugin = _render(ds, decoder, f, options)
            pngs.append(png.encode(image, options.size))
            plugins.append(plugin)
        return frames, pngs, ",".join(dict.fromkeys(plugins))
    except PacsEmbedError:
        raise
    except MemoryError:
        raise  # not this object's fault: let the pool see it and retry later
    except Exception as exc:
        raise ConversionError(
            f"cannot convert pixel data (unexpected {type(exc).__name__}, see detail)",
            detail=" ".join(f"{type(exc).__name__}: {exc}".split()),  # one line
        ) from exc


def to_png(ds: Dataset, options: ConvertOptions = _DEFAULT_OPTIONS) -> list[bytes]:
    """PNG bytes, one per frame chosen by the modality's frame policy.

    Raises NoPixelDataError for objects without an image, ConversionError for anything that
    cannot be decoded or rendered.
    """
    return _frames_and_pngs(ds, _resolve(ds, options))[1]


def _optional_int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def convert_file(
    path: str | os.PathLike[str], options: ConvertOptions = _DEFAULT_OPTIONS
) -> ConvertedImage:
    """Read a DICOM file, apply series sampling, convert; top-level so a process pool can pickle it.

    Raises NotSampledError when the modality's series policy leaves the instance out (decided
    from its header before any pixel is decoded). Only UIDs, SOP Class, Modality, Body Part
    Examined and the view are copied out (``fields.record_of``): no patient data.
    """
    ds = decode.read(Path(path), options.max_decoded_bytes)
    record = fields.record_of(ds, options)
    resolved = options.for_modality(record.modality)
    if decode.has_pixel_data(ds):  # without, conversion says why: "no Pixel Data (...)"
        fields.check_embeddable(record, options)
        reason = series_skip_reason(
            _optional_int(ds, "InstanceNumber"),
            _optional_int(ds, "ImagesInAcquisition"),
            resolved.series_policy,
            resolved.series_param,
        )
        if reason is not None:
            raise NotSampledError(reason)
    frames, pngs, decoder = _frames_and_pngs(ds, resolved)
    return ConvertedImage(
        images=tuple(record.at_frame(frame) for frame in frames),
        pngs=tuple(pngs),
        decoder=decoder,
    )
