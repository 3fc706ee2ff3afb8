"""Read the grey-level parameters (Modality LUT, VOI, polarity) of one frame from a dataset.

Enhanced multi-frame objects keep rescale and window in the Shared / Per-Frame Functional Groups
instead of the top level (pydicom's ``apply_voi_lut`` ignores them there), so the lookup order is:
the frame's Per-Frame group, then the Shared group, then the top-level attribute.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pipeline.convert.pixels import VOI_FUNCTIONS, Lut, Modality, Rescale, Voi, Window

_PIXEL_VALUE_TRANSFORMATION = "PixelValueTransformationSequence"
_FRAME_VOI_LUT = "FrameVOILUTSequence"


def _group_items(ds: Dataset, frame: int, macro: str) -> list[Dataset]:
    """The macro's items for ``frame``: Per-Frame first, then Shared."""
    items: list[Dataset] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        items.extend(per_frame[frame].get(macro, [])[:1])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        items.extend(shared[0].get(macro, [])[:1])
    return items


def _first(sources: Iterable[Dataset], keyword: str) -> Any:
    for src in sources:
        value = src.get(keyword)
        if value is not None and value != "":
            return value
    return None


def _values(value: Any) -> list[Any]:
    """A single- or multi-valued element's value as a list (empty when absent)."""
    if value is None:
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _floats(value: Any) -> list[float]:
    return [float(v) for v in _values(value) if v is not None and v != ""]


def _lut(item: Dataset, signed: bool) -> Lut | None:
    """A Modality/VOI LUT Sequence item as a :class:`Lut`; None when it is unusable."""
    desc = item.get("LUTDescriptor")
    raw = item.get("LUTData")
    if desc is None or raw is None or len(desc) != 3:
        return None
    entries = int(desc[0]) or 65536
    first = int(desc[1])
    bits = int(desc[2])
    if isinstance(raw, bytes):
        dtype = np.uint8 if bits <= 8 and len(raw) == entries else np.dtype("<u2")
        data = np.frombuffer(raw, dtype=dtype).astype(np.int64)
    else:
        data = np.asarray(raw if isinstance(raw, MultiValue | list) else [raw], dtype=np.int64)
    if data.size == 0 or not 1 <= bits <= 16:
        return None
    # The first-mapped value is SS for signed pixel data, but an explicit-VR file may still
    # label it US, so a negative first value can arrive as 2**16 - n.
    if signed and first > 32767:
        first -= 65536
    return Lut(first_mapped=first, bits=bits, data=data[:entries])


def _signed(ds: Dataset) -> bool:
    return int(ds.get("PixelRepresentation", 0) or 0) == 1


def modality_of(ds: Dataset, frame: int = 0) -> Modality:
    """Rescale Slope/Intercept or Modality LUT Sequence for ``frame`` (identity if neither)."""
    sources = [*_group_items(ds, frame, _PIXEL_VALUE_TRANSFORMATION), ds]
    slope, intercept = _first(sources, "RescaleSlope"), _first(sources, "RescaleIntercept")
    if slope is not None or intercept is not None:
        return Rescale(
            slope=float(slope) if slope is not None else 1.0,
            intercept=float(intercept) if intercept is not None else 0.0,
        )
    seq = ds.get("ModalityLUTSequence")
    if seq:
        lut = _lut(seq[0], _signed(ds))
        if lut is not None:
            return lut
    return Rescale()


def _strings(value: Any) -> list[str]:
    return [str(v or "").strip().upper() for v in _values(value)]


def pick_window(n_pairs: int, explanations: list[str], index: int, explanation: str | None) -> int:
    """Which of ``n_pairs`` windows to use: the first whose Explanation matches ``explanation``
    (case-insensitive), else pair ``index``, else the first."""
    if explanation:
        wanted = explanation.strip().upper()
        for i, text in enumerate(explanations[:n_pairs]):
            if text == wanted:
                return i
    return index if index < n_pairs else 0


def voi_of(
    ds: Dataset, frame: int = 0, window_index: int = 0, window_explanation: str | None = None
) -> Voi | None:
    """The frame's VOI: a window (chosen by :func:`pick_window`), else a VOI LUT.

    A window of width < 1 (invalid per PS3.3) is ignored; None means "no VOI in the header".
    A window is preferred over a VOI LUT Sequence when both are present, because the window is
    what ``window_index`` selects and what DCMTK applies with ``+Wi``. Centre, width and
    explanation are read from the same item, so the explanation names the pair it sits beside.
    """
    sources = [*_group_items(ds, frame, _FRAME_VOI_LUT), ds]
    holder = next((src for src in sources if src.get("WindowCenter") not in (None, "")), None)
    if holder is not None:
        centers = _floats(holder.get("WindowCenter"))
        widths = _floats(holder.get("WindowWidth"))
        pairs = list(zip(centers, widths, strict=False))
        explanations = _strings(holder.get("WindowCenterWidthExplanation"))
        if pairs:
            center, width = pairs[
                pick_window(len(pairs), explanations, window_index, window_explanation)
            ]
            function = str(_first(sources, "VOILUTFunction") or "LINEAR").strip().upper()
            if function not in VOI_FUNCTIONS:
                function = "LINEAR"
            if width >= 1.0 or (function != "LINEAR" and width > 0.0):
                return Window(center=center, width=width, function=function)
    for src in sources:
        seq = src.get("VOILUTSequence")
        if seq:
            lut = _lut(seq[0], _signed(ds))
            if lut is not None:
                return lut
    return None


def is_monochrome1(ds: Dataset) -> bool:
    """True when low values display white; the VOI output is inverted for these."""
    return str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
