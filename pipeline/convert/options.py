"""What a conversion is asked to do (:class:`ConvertOptions`) and what it returns.

Both are frozen dataclasses of plain values so they pickle cheaply into the converter
``ProcessPoolExecutor`` and back. Options are checked once, when built, so a bad setting fails
at start-up with the setting's name instead of quarantining every image later.

Per-modality rules (:class:`ModalityRule`) override the global values field by field;
:meth:`ConvertOptions.for_modality` resolves them once per object into plain options, so the
pixel code never looks at modalities.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.vocabulary import DEFAULT_EMBED_MODALITIES, DEFAULT_SKIP_SOP_CLASSES

#: Output side in pixels: the MedImageInsight endpoint resizes every image to exactly 512x512,
#: so sending that size saves bandwidth without changing what the model sees.
DEFAULT_SIZE = 512

#: Sampling policies, for the frames of a multi-frame object and the slices of a series (§4.5).
FRAME_POLICIES = ("all", "middle", "every_n", "max_k")

#: Percentiles stretched to black/white when the header carries no VOI (window or VOI LUT).
DEFAULT_PERCENTILES = (0.5, 99.5)

#: Rows*Columns*Frames above which an object is refused: a decompression-bomb guard. 200 M
#: pixels is ~400 MB of 16-bit data, more than any real radiograph or CT volume in one object.
DEFAULT_MAX_PIXELS = 200_000_000

#: Bytes the conversion may decode: the selected frames' stored values, and an inflated Deflated
#: data set. 1 GiB holds 250 frames of a 2000x2000 16-bit cine; a 2 MB deflated file claiming
#: more is a zip bomb, refused before it is inflated.
DEFAULT_MAX_DECODED_BYTES = 1 << 30


def _check_policy(name: str, policy: str | None, param: int | None) -> None:
    if policy is not None and policy not in FRAME_POLICIES:
        raise ConfigError(
            f"convert {name}_policy must be one of {', '.join(FRAME_POLICIES)}, got {policy!r}"
        )
    if param is not None and param < 1:
        raise ConfigError(f"convert {name}_param must be >= 1, got {param}")


def _check_overridable(options: ModalityRule | ConvertOptions) -> None:
    """The checks of the fields a :class:`ModalityRule` can override (None: not overridden)."""
    _check_policy("frame", options.frame_policy, options.frame_param)
    _check_policy("series", options.series_policy, options.series_param)
    window = options.preset_window
    if window is not None and not window[1] >= 1.0:
        raise ConfigError(
            f"convert preset_window width must be >= 1 (PS3.3 C.11.2.1.2), got {window}"
        )
    if options.window_index is not None and options.window_index < 0:
        raise ConfigError(f"convert window_index must be >= 0, got {options.window_index}")


@dataclass(frozen=True)
class ModalityRule:
    """Overrides for one Modality (e.g. ``CT``); None keeps the global value.

    ``window_explanation`` selects the Window Center/Width pair whose Explanation matches
    (case-insensitive), before ``window_index``; ``preset_window`` (center, width, in modality
    units such as HU) applies only when the header has no VOI at all.
    """

    window_index: int | None = None
    window_explanation: str | None = None
    preset_window: tuple[float, float] | None = None
    frame_policy: str | None = None
    frame_param: int | None = None
    series_policy: str | None = None
    series_param: int | None = None

    def __post_init__(self) -> None:
        _check_overridable(self)


@dataclass(frozen=True)
class ConvertOptions:
    """How to turn one DICOM object into PNGs; validated on construction (raises ConfigError).

    ``size`` 0 or None keeps the native size (used to compare with DCMTK before resizing).
    ``window_index`` picks the Window Center/Width pair; an object with fewer pairs uses its first.
    ``modalities`` holds (Modality, rule) pairs; a tuple, not a dict, so the options stay hashable.
    """

    size: int | None = DEFAULT_SIZE
    frame_policy: str = "middle"
    frame_param: int = 1
    series_policy: str = "all"
    series_param: int = 1
    window_index: int = 0
    window_explanation: str | None = None
    preset_window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    modalities: tuple[tuple[str, ModalityRule], ...] = ()
    embed_modalities: tuple[str, ...] = DEFAULT_EMBED_MODALITIES
    skip_sop_classes: tuple[str, ...] = DEFAULT_SKIP_SOP_CLASSES
    #: The site's Body Part Examined spellings (``detect.body_part_aliases``), so a body part
    #: leaves the listener host already normalised.
    body_part_aliases: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 0:
            raise ConfigError(f"convert size must be >= 0 (0 = native), got {self.size}")
        _check_overridable(self)
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ConfigError(
                f"convert percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}"
            )
        if self.max_pixels < 1:
            raise ConfigError(f"convert max_pixels must be >= 1, got {self.max_pixels}")
        if self.max_decoded_bytes < 1:
            raise ConfigError(
                f"convert max_decoded_bytes must be >= 1, got {self.max_decoded_bytes}"
            )
        names = [name for name, _rule in self.modalities]
        for name in names:
            if not name or name != name.strip().upper() or len(name) > 16:
                raise ConfigError(f"convert modality {name!r} must be an upper-case code like CT")
        if len(set(names)) != len(names):
            raise ConfigError(f"convert modalities are listed twice: {sorted(names)}")
        for code in self.embed_modalities:
            if not code or code != code.strip().upper() or len(code) > 16:
                raise ConfigError(f"convert embed_modalities: {code!r} is not a code like CT")

    def for_modality(self, modality: str) -> ConvertOptions:
        """These options with the rule of ``modality`` (if any) applied, and no rules left."""
        rule = dict(self.modalities).get(modality.strip().upper())
        if rule is None:
            return dataclasses.replace(self, modalities=()) if self.modalities else self
        overrides = {
            f.name: getattr(rule, f.name)
            for f in dataclasses.fields(rule)
            if getattr(rule, f.name) is not None
        }
        return dataclasses.replace(self, modalities=(), **overrides)


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
    #: The plugin that decoded the pixels ("pylibjpeg", "pillow", "gdcm", ...; "native" when
    #: uncompressed); frames decoded by different plugins list each once, comma-separated.
    decoder: str = ""


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


def series_skip_reason(
    instance_number: int | None, series_size: int | None, policy: str, param: int = 1
) -> str | None:
    """Why the slice numbered ``instance_number`` is left out of its series, or None to keep it.

    Decided per instance, from its own header, because instances arrive one by one and the
    listener never knows when a series is complete. ``every_n`` keeps Instance Numbers 1, 1+n,
    1+2n... ``middle`` and ``max_k`` need the series size: Images in Acquisition (0020,1002)
    when the scanner writes it, applied like :func:`select_frames` to Instance Number - 1.
    Without the numbers needed, the instance is kept: embedding a slice too many costs a
    request, leaving one out loses it for good.
    """
    if policy == "all" or instance_number is None or instance_number < 1:
        return None
    if policy == "every_n":
        if (instance_number - 1) % param == 0:
            return None
        return (
            f"not sampled: series policy every_n {param} keeps Instance Numbers 1, {1 + param}, "
            f"{1 + 2 * param}..., not {instance_number}"
        )
    if series_size is None or not 1 <= instance_number <= series_size:
        return None
    if instance_number - 1 in select_frames(series_size, policy, param):
        return None
    described = policy if policy == "middle" else f"{policy} {param}"
    return (
        f"not sampled: series policy {described} leaves out Instance Number {instance_number} "
        f"of {series_size} (Images in Acquisition)"
    )
