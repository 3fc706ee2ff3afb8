"""8-bit arrays -> resized, lossless PNG bytes (Pillow).

Resize filter: LANCZOS. Pillow scales its support with the reduction factor, so downsizing a
3,000-pixel radiograph to 512 is properly antialiased, and unlike BOX it also upsizes a 128x128
MR smoothly instead of in blocks; its slight ringing at hard edges is clipped to 0..255.
``reducing_gap`` lets Pillow first box-reduce by an integer factor when the input is at least
3x the target. The resize is a plain one to a square, which is what the endpoint itself does.

zlib settings, measured on 512x512 renders of real files (KB / ms per image, Pillow 13, whose
PNG writer picks a row filter adaptively; "rle" is zlib's Z_RLE strategy;
``python -m bench.convert_choices`` re-measures the grey rows and US1):

    grey           level 1     level 3     level 6      level 9      rle
    693 CT         46 / 2.5    45 / 3.0    42 / 5.2     41 / 19.2    36 / 2.2
    CT_small       95 / 3.8    89 / 5.6    85 / 17.0    84 / 46.1    84 / 3.6
    RG1 CR        122 / 6.1   117 / 8.5   112 / 24.1   110 / 78.0    98 / 5.5
    MR2           147 / 6.7   146 / 7.6   141 / 10.3   141 / 11.5   132 / 5.0
    colour
    US1 RGB       189 / 8.3   177 / 10.9  175 / 23.0               262 / 7.3
    3-D US frame  137 / 7.7   126 / 9.8   119 / 20.7               152 / 7.2
    ALOKA palette 187 / 8.8   166 / 11.8  168 / 27.7               266 / 8.3

After PNG's row filters a grey image is mostly short runs, so Z_RLE is both the smallest and the
fastest on every grey image (12-20% smaller than level 6, faster than level 1). Colour rows keep
more entropy and Z_RLE loses badly there; level 3 is the knee (7-11% smaller than level 1 for
~30% more CPU; level 6 doubles the CPU for 0-6% more). Bytes are the scarcer resource: at the
endpoint's ~5 MB/s a 180 KB colour image is 36 ms of shared bandwidth, the zlib ms run in parallel.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import numpy.typing as npt
from PIL import Image

#: zlib (level, strategy) for grey PNGs: Z_RLE ignores the level beyond choosing its tables.
GREY_ZLIB = (1, zlib.Z_RLE)

#: zlib (level, strategy) for colour PNGs; see the module docstring for both measurements.
COLOR_ZLIB = (3, zlib.Z_DEFAULT_STRATEGY)

#: Pillow's two-step resize threshold: reduce by an integer factor first when the image is at
#: least this many times the target (quality stays LANCZOS-like, time drops a lot).
REDUCING_GAP = 3.0


def resize(image: npt.NDArray[np.uint8], size: int | None) -> Image.Image:
    """An 8-bit (rows, columns) or (rows, columns, 3) array as a Pillow image, size x size.

    ``size`` 0 or None keeps the native size.
    """
    # uint8 (rows, columns) becomes mode L, (rows, columns, 3) mode RGB.
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if size and pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    return pil


def encode_image(pil: Image.Image) -> bytes:
    """Lossless PNG bytes with the measured zlib settings for the image's mode."""
    level, strategy = GREY_ZLIB if pil.mode == "L" else COLOR_ZLIB
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=level, compress_type=strategy)
    return buf.getvalue()


def encode(image: npt.NDArray[np.uint8], size: int | None) -> bytes:
    """Resize (unless ``size`` is 0/None) and encode: the last two stages of every conversion."""
    return encode_image(resize(image, size))
