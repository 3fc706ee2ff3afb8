"""PALETTE COLOR indices -> 8-bit RGB.

Plain palettes are read here because pydicom 3.0's ``apply_color_lut`` reads their 16-bit entries
in the machine's byte order whatever the transfer syntax, scrambling every Explicit VR Big Endian
palette (OBXXXX1A_expb renders as noise through it); segmented palettes, which it reads in the
right order, still go through pydicom.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import UID


def apply_palette(index: npt.NDArray[Any], ds: Dataset) -> npt.NDArray[np.uint8]:
    """Look ``index`` up in the dataset's palette; 16-bit entries keep their high byte, as in
    DCMTK. Indices below the first mapped value take the first entry, beyond the table the last.
    """
    if "RedPaletteColorLookupTableData" not in ds:
        rgb = apply_color_lut(index, ds)[..., :3]
        return (rgb >> 8).astype(np.uint8) if rgb.dtype.itemsize > 1 else rgb.astype(np.uint8)
    entries, first, _bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
    entries = entries or 65536
    big = not UID(str(ds.file_meta.TransferSyntaxUID)).is_little_endian
    channels = []
    for color in ("Red", "Green", "Blue"):
        raw = bytes(ds[f"{color}PaletteColorLookupTableData"].value)
        width = 2 if len(raw) >= 2 * entries else 1
        lut = np.frombuffer(raw, dtype=(">u2" if big else "<u2") if width == 2 else "u1")
        channels.append((lut[:entries] >> 8 if width == 2 else lut[:entries]).astype(np.uint8))
    table = np.stack(channels, axis=-1)
    return table[np.clip(index.astype(np.int64) - first, 0, entries - 1)]
