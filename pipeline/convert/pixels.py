"""Grey-level pipeline: stored values -> Modality LUT -> VOI -> 8 bits. Pure numpy.

Rounding follows DCMTK ``dcmj2pnm`` 3.6.7, measured here against it, so our output and the
reference tool agree exactly on the common cases instead of differing by one grey level on half
the pixels:

* Window (PS3.3 C.11.2.1.2 LINEAR, C.11.2.1.3.2 SIGMOID): the formula's 0..255 value is
  truncated (``floor``), not rounded; MONOCHROME1 is inverted *before* truncating,
  ``floor(255 - y)``. LINEAR_EXACT (C.11.2.1.3.1) is implemented per the standard
  (DCMTK ignores it and uses LINEAR: they then differ by at most 1).
* VOI LUT Sequence: an n-bit LUT value goes to 8 bits as ``v >> (n - 8)``; MONOCHROME1 then
  ``255 - that``. (DCMTK's own MONOCHROME1 path computes ``255 - v*254/2**n``, which never
  reaches black; we do not copy that, so the two differ by at most 1 there.)
* Rescale stays in floating point. DCMTK quantises the Modality LUT output to integers, which
  only matters for non-integer slope/intercept (PET, some MR); copying it would flatten a PET
  with slope 0.001 to three grey levels.

Integer input goes through a lookup table over its value range (the same function evaluated on
every possible stored value, then indexed): identical results, several times faster than
evaluating floats per pixel on a large radiograph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
U8Array = npt.NDArray[np.uint8]

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass(frozen=True)
class Rescale:
    """Modality LUT as Rescale Slope/Intercept (the usual case: CT HU)."""

    slope: float = 1.0
    intercept: float = 0.0


@dataclass(frozen=True)
class Lut:
    """A Modality or VOI LUT Sequence item: ``data[x - first_mapped]``, clamped at both ends."""

    first_mapped: int
    bits: int
    data: npt.NDArray[np.int64]


@dataclass(frozen=True)
class Window:
    """A Window Center/Width pair with its VOI LUT Function (unknown functions mean LINEAR)."""

    center: float
    width: float
    function: str = "LINEAR"


Modality = Rescale | Lut
Voi = Window | Lut


def lut_lookup(x: npt.NDArray[np.generic], lut: Lut) -> npt.NDArray[np.int64]:
    """Values of ``lut`` at ``x``: below the first entry map to it, beyond the last to the last."""
    idx = np.rint(np.asarray(x, dtype=np.float64) - lut.first_mapped)
    idx = np.clip(idx, 0, len(lut.data) - 1).astype(np.intp)
    return lut.data[idx]


def apply_modality(x: npt.NDArray[np.generic], modality: Modality) -> FloatArray:
    """Stored values -> modality values (e.g. HU) as float64."""
    if isinstance(modality, Lut):
        return lut_lookup(x, modality).astype(np.float64)
    out = np.asarray(x, dtype=np.float64)
    if modality.slope != 1.0:
        out = out * modality.slope
    if modality.intercept != 0.0:
        out = out + modality.intercept
    return out


def window_level(x: FloatArray, window: Window, invert: bool = False) -> FloatArray:
    """PS3.3 C.11.2.1.2/3 window functions to the 0..255 range, unrounded.

    ``invert`` (MONOCHROME1) gives ``255 - y``. LINEAR is evaluated in DCMTK's own arithmetic
    (``offset + x * gradient`` with the output range 255 -> 0 when inverted) so that values
    landing on an integer truncate the same way in both; the textbook form differs from DCMTK
    on ~0.3% of pixels by floating-point rounding alone.
    """
    c, w = window.center, window.width
    if window.function in ("SIGMOID", "LINEAR_EXACT"):
        if window.function == "SIGMOID":
            with np.errstate(over="ignore"):
                y = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        else:
            y = np.clip((x - c) / w + 0.5, 0.0, 1.0) * 255.0
        return np.asarray(255.0 - y if invert else y, dtype=np.float64)
    low, high = (255.0, 0.0) if invert else (0.0, 255.0)
    left = c - 0.5 - (w - 1.0) / 2.0
    right = c - 0.5 + (w - 1.0) / 2.0
    if w <= 1.0:  # width 1 is a step at c - 0.5 (the formula would divide by zero)
        return np.where(x <= left, low, high)
    gradient = (high - low) / (w - 1.0)
    offset = high - ((c - 0.5) / (w - 1.0) + 0.5) * (high - low)
    y = offset + x * gradient
    return np.asarray(np.where(x <= left, low, np.where(x > right, high, y)), dtype=np.float64)


def voi_to_u8(x: FloatArray, voi: Voi, mono1: bool) -> U8Array:
    """Modality values -> 8-bit display values, MONOCHROME1 inverted after the VOI."""
    if isinstance(voi, Lut):
        v = np.clip(lut_lookup(x, voi), 0, (1 << voi.bits) - 1)
        v8 = v >> (voi.bits - 8) if voi.bits >= 8 else v << (8 - voi.bits)
        if mono1:
            v8 = 255 - v8
        return v8.astype(np.uint8)
    y = window_level(x, voi, invert=mono1)
    return np.clip(np.floor(y), 0.0, 255.0).astype(np.uint8)


def stretch_window(
    values: FloatArray, counts: npt.NDArray[np.int64] | None, percentiles: tuple[float, float]
) -> Window:
    """LINEAR window mapping the ``percentiles`` of the data to black and white.

    ``values`` are the distinct modality values (sorted or not) with their ``counts``, or every
    pixel when ``counts`` is None. Quantiles are the inverted-CDF kind (actual data values), so
    the lookup-table path and the per-pixel path choose the same window. The window is returned
    as centre/width so ``dcmj2pnm +Ww c w`` reproduces it: lo -> 0 and everything > hi -> 255.
    """
    if counts is None:
        values, counts = np.unique(values, return_counts=True)
    order = np.argsort(values, kind="stable")
    v, cum = values[order], np.cumsum(counts[order])
    total = cum[-1]
    lo, hi = (
        float(v[min(np.searchsorted(cum, p / 100.0 * total, side="left"), len(v) - 1)])
        for p in percentiles
    )
    return Window(center=(lo + hi) / 2.0 + 0.5, width=hi - lo + 1.0)


def gray_to_u8(
    stored: npt.NDArray[np.generic],
    modality: Modality,
    voi: Voi | None,
    mono1: bool,
    percentiles: tuple[float, float],
    bits_stored: int = 0,
) -> U8Array:
    """One grey frame of stored values -> 8-bit, through a lookup table for 8/16-bit integers.

    ``bits_stored`` (0: all bits) masks the bits above it and sign-extends signed data; for
    8/16-bit input this happens inside the table, so raw Pixel Data can be passed unmasked.
    """
    if stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2 and stored.size:
        return _gray_by_lut(stored, modality, voi, mono1, percentiles, bits_stored)
    values = apply_modality(np.nan_to_num(stored.astype(np.float64)), modality)
    if voi is None:
        voi = stretch_window(values.ravel(), None, percentiles)
    return voi_to_u8(values, voi, mono1)


def _domain(bits: int, bits_stored: int, signed: bool) -> npt.NDArray[np.int64]:
    """The stored value each ``bits``-wide bit pattern means: masked, sign-extended if signed."""
    pattern = np.arange(1 << bits, dtype=np.int64)
    used = bits_stored if 0 < bits_stored < bits else bits
    value = pattern & ((1 << used) - 1)
    if signed:
        value = np.where(value >= 1 << (used - 1), value - (1 << used), value)
    return value


@functools.lru_cache(maxsize=32)
def _fixed_table(
    bits: int, bits_stored: int, signed: bool, modality: Rescale, voi: Window, mono1: bool
) -> U8Array:
    """The whole pipeline for every bit pattern, kept: a series repeats the same parameters."""
    table = voi_to_u8(apply_modality(_domain(bits, bits_stored, signed), modality), voi, mono1)
    table.flags.writeable = False
    return table


def _gray_by_lut(
    stored: npt.NDArray[np.generic],
    modality: Modality,
    voi: Voi | None,
    mono1: bool,
    percentiles: tuple[float, float],
    bits_stored: int,
) -> U8Array:
    """8/16-bit integers: evaluate the pipeline once per possible bit pattern, then index.

    The table is laid out by the values' unsigned bit pattern, so signed data is indexed through
    a free ``view`` instead of an offset copy. Tables of hashable parameters (rescale + window,
    the CT case) are cached, so a series pays for one table, not one per slice.
    """
    if not stored.dtype.isnative:  # big-endian Pixel Data: the view below needs native order
        stored = stored.astype(stored.dtype.newbyteorder("="))
    bits = 8 * stored.dtype.itemsize
    signed = stored.dtype.kind == "i"
    index = stored.view(np.dtype(f"u{stored.dtype.itemsize}"))
    if isinstance(modality, Rescale) and isinstance(voi, Window):
        return np.take(_fixed_table(bits, bits_stored, signed, modality, voi, mono1), index)
    values = apply_modality(_domain(bits, bits_stored, signed), modality)
    if voi is None:
        counts = np.bincount(index.ravel(), minlength=1 << bits).astype(np.int64)
        present = counts > 0
        voi = stretch_window(values[present], counts[present], percentiles)
    return np.take(voi_to_u8(values, voi, mono1), index)


def color_to_u8(rgb: npt.NDArray[np.generic], bits_stored: int) -> U8Array:
    """RGB samples of any depth -> 8 bits by dropping low bits (as DCMTK does)."""
    if rgb.dtype == np.uint8 or bits_stored <= 8:
        return np.asarray(rgb, dtype=np.uint8)
    return (np.asarray(rgb).astype(np.uint32) >> (bits_stored - 8)).astype(np.uint8)
