"""What a conversion is asked to do (:class:`ConvertOptions`) and what it returns.

Both are frozen dataclasses of plain values so they pickle cheaply into the converter
``ProcessPoolExecutor`` and back. Options are checked once, when built, so a bad setting fails
at start-up with the setting's name instead of quarantining every image later.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError

#: Output side in pixels: the MedImageInsight endpoint resizes every image to exactly 512x512,
#: so sending that size saves bandwidth without changing what the model sees.
DEFAULT_SIZE = 512

#: Frame sampling policies for multi-frame objects (DESIGN.md §4.5).
FRAME_POLICIES = ("all", "middle", "every_n", "max_k")

#: Percentiles stretched to black/white when the header carries no VOI (window or VOI LUT).
DEFAULT_PERCENTILES = (0.5, 99.5)

#: Rows*Columns*Frames above which an object is refused: a decompression-bomb guard. 200 M
#: pixels is ~400 MB of 16-bit data, more than any real radiograph or CT volume in one object.
DEFAULT_MAX_PIXELS = 200_000_000


@dataclass(frozen=True)
class ConvertOptions:
    """How to turn one DICOM object into PNGs; validated on construction (raises ConfigError).

    ``size`` 0 or None keeps the native size (used to compare with DCMTK before resizing).
    ``window_index`` picks the Window Center/Width pair; an object with fewer pairs uses its first.
    """

    size: int | None = DEFAULT_SIZE
    frame_policy: str = "middle"
    frame_param: int = 1
    window_index: int = 0
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 0:
            raise ConfigError(f"convert size must be >= 0 (0 = native), got {self.size}")
        if self.frame_policy not in FRAME_POLICIES:
            raise ConfigError(
                f"convert frame_policy must be one of {', '.join(FRAME_POLICIES)}, "
                f"got {self.frame_policy!r}"
            )
        if self.frame_param < 1:
            raise ConfigError(f"convert frame_param must be >= 1, got {self.frame_param}")
        if self.window_index < 0:
            raise ConfigError(f"convert window_index must be >= 0, got {self.window_index}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ConfigError(
                f"convert percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}"
            )
        if self.max_pixels < 1:
            raise ConfigError(f"convert max_pixels must be >= 1, got {self.max_pixels}")


@dataclass(frozen=True)
class ConvertedImage:
    """One object's PNGs plus the few non-PHI header fields the embed workers may see."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str
    body_part: str
    frames: tuple[int, ...]
    pngs: tuple[bytes, ...]


def select_frames(n_frames: int, policy: str, param: int = 1) -> list[int]:
    """0-based indices of the frames to embed under ``policy``.

    ``max_k`` spreads k frames evenly from first to last so a long cine or a 3-D volume is
    sampled end to end; fewer than k frames means all of them.
    """
    if n_frames < 1:
        return []
    if policy == "all":
        return list(range(n_frames))
    if policy == "middle":
        return [n_frames // 2]
    if policy == "every_n":
        return list(range(0, n_frames, param))
    if policy == "max_k":
        if n_frames <= param:
            return list(range(n_frames))
        if param == 1:
            return [n_frames // 2]
        step = (n_frames - 1) / (param - 1)
        return sorted({round(i * step) for i in range(param)})
    raise ConfigError(f"unknown frame policy {policy!r}")
