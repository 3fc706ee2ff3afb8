"""Decompression-bomb guards that read sizes, never pixels.

The header's Rows x Columns x Frames cap is only half a guard: a JPEG or JPEG 2000 codestream
carries its own dimensions, and the decoder allocates what the *codestream* says before pydicom
compares it with the header. So each compressed frame's declared size is read from its SOF / SIZ
marker and refused when it exceeds the header's. A Deflated data set is inflated in bounded
chunks, counting bytes, before pydicom inflates it in one piece.
"""

from __future__ import annotations

import struct
import zlib

from pipeline.errors import ConversionError

#: JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic) and
#: JPEG-LS SOF55: all carry P, Y, X right after the segment length.
_SOF_MARKERS = frozenset((*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), 0xCD, 0xCE))
_SOF_MARKERS |= {0xCF, 0xF7}

#: JPEG 2000 codestream: SOC followed by SIZ (PS3.5 A.4.4 allows a JP2 wrapper before it).
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"

#: How far into a frame the first SOF / SIZ marker is looked for: tables come first in JPEG.
_SCAN_LIMIT = 1 << 16

_INFLATE_CHUNK = 1 << 20


def codestream_shape(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG / JPEG-LS / JPEG 2000 frame declares; None if not found."""
    if frame[:2] == b"\xff\xd8":
        return _jpeg_shape(frame)
    at = frame.find(_J2K_SOC_SIZ, 0, _SCAN_LIMIT)
    if at >= 0 and len(frame) >= at + 24:
        # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz (PS3 ISO 15444-1 A.5.1)
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[at + 8 : at + 24])
        return ysiz - yo, xsiz - xo
    return None


def _jpeg_shape(frame: bytes) -> tuple[int, int] | None:
    pos = 2
    end = min(len(frame), _SCAN_LIMIT)
    while pos + 4 <= end:
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack(">H", frame[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS and pos + 9 <= len(frame):
            rows, columns = struct.unpack(">HH", frame[pos + 5 : pos + 9])
            return (rows, columns) if rows else None  # 0: height given later by DNL
        pos += 2 + length
    return None


def check_codestream(frame: bytes, rows: int, columns: int, index: int) -> None:
    """Refuse a compressed frame declaring more pixels than the header's Rows x Columns."""
    shape = codestream_shape(frame)
    if shape is not None and shape[0] * shape[1] > rows * columns:
        raise ConversionError(
            f"frame {index} codestream declares {shape[0]}x{shape[1]} pixels, more than the "
            f"header's Rows x Columns {rows}x{columns}: refused as a decompression bomb"
        )


def check_inflated_size(deflated: memoryview, limit: int) -> None:
    """Inflate a Deflated data set in chunks, keeping none, and refuse it past ``limit`` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    position = 0
    try:
        while not inflater.eof:
            # max_length bounds each output; input it could not use waits in the tail
            data = inflater.unconsumed_tail or deflated[position : position + _INFLATE_CHUNK]
            if not inflater.unconsumed_tail:
                position += len(data)
            inflated = len(inflater.decompress(data, _INFLATE_CHUNK))  # b"": flush what is held
            total += inflated
            if total > limit:
                raise ConversionError(
                    f"Deflated data set inflates to more than {limit} bytes "
                    "(max_decoded_bytes): refused as a decompression bomb"
                )
            if not data and not inflated:
                break  # input used up, nothing held back: the stream has no end
    except zlib.error as exc:
        raise ConversionError(f"Deflated data set is corrupt: {exc}") from exc
    if not inflater.eof:
        raise ConversionError(
            "data set is truncated: the Deflated stream ends before its end marker"
        )
