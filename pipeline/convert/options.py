"""What a conversion is asked to do (:class:`ConvertOptions`) and what it returns.

``ConvertOptions`` is the [convert] section (:class:`pipeline.sections.ConvertSettings`, where
every option is declared with its default and its rules) plus the site's body part aliases: a
frozen pydantic value that pickles cheaply into the converter ``ProcessPoolExecutor``, checked
once when built, so a bad setting fails at start-up with the setting's name instead of
quarantining every image later. ``ConvertedImage`` comes back.

Per-modality rules (:class:`ModalityRule`) override the global values key by key;
:meth:`ConvertOptions.for_modality` resolves them once per object into plain options, so the
pixel code never looks at modalities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import Field

from pipeline.errors import ConfigError
from pipeline.records import ImageRecord
from pipeline.sections import ConvertSettings, ModalityRule

if TYPE_CHECKING:
    from pipeline.settings import Settings

__all__ = [
    "ConvertOptions",
    "ConvertedImage",
    "ModalityRule",
    "select_frames",
    "series_skip_reason",
]


class ConvertOptions(ConvertSettings):
    """How to turn one DICOM object into PNGs: [convert] as the conversion pool receives it.

    ``size`` 0 keeps the native size (used to compare with DCMTK before resizing).
    """

    #: The site's Body Part Examined spellings (``detect.body_part_aliases``), so a body part
    #: leaves the listener host already normalised.
    body_part_aliases: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, *, native_size: bool = False) -> ConvertOptions:
        """The daemon's options: [convert] with the detect section's body part aliases."""
        return cls(
            **{
                **dict(settings.convert),
                "size": 0 if native_size else settings.convert.size,
                "body_part_aliases": settings.detect.body_part_aliases,
            }
        )

    def for_modality(self, modality: str) -> ConvertOptions:
        """These options with the rule of ``modality`` (if any) applied, and no rules left."""
        rule = self.modality.get(modality.strip().upper())
        if rule is None:
            return self.model_copy(update={"modality": {}}) if self.modality else self
        overrides = {key: value for key, value in rule if value is not None}
        return self.model_copy(update={**overrides, "modality": {}})


@dataclass(frozen=True)
class ConvertedImage:
    """One object converted: a record (its identity and non-PHI header fields) and a PNG per
    selected frame, row-aligned."""

    images: tuple[ImageRecord, ...]
    pngs: tuple[bytes, ...]
    #: The plugin that decoded the pixels ("pylibjpeg", "pillow", "gdcm", ...; "native" when
    #: uncompressed); frames decoded by different plugins list each once, comma-separated.
    decoder: str = ""

    @property
    def frames(self) -> tuple[int, ...]:
        """The selected frames (0-based), in order."""
        return tuple(image.frame for image in self.images)


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
