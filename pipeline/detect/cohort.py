"""Cohort keys: which images are peers, read from the few non-PHI header fields a worker sees.

A cohort is (Modality, normalised BodyPartExamined[, view]), written ``CR/CHEST`` or
``CR/CHEST/PA``. Vendors spell the same body part many ways (``CHEST``, ``Chest``, ``THORAX``,
``Thorax PA``, empty), and an image compared with the wrong peers is flagged for its spelling,
not its content; so the spelling is normalised before it names a cohort.

Keys contain only ``[A-Z0-9_/]``: they are safe inside Redis keys (and inside a Redis Cluster
hash tag ``{...}``) and in file names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.vocabulary import (
    normalise_body_part,
    normalise_modality,
    normalise_view,
)

__all__ = ["FIELDS", "CohortRule"]


#: The header fields a cohort key can be built from, in key order.
FIELDS = ("modality", "body_part", "view")


@dataclass(frozen=True)
class CohortRule:
    """How a header becomes a cohort key: which fields, and the site's extra spellings."""

    fields: Sequence[str] = ("modality", "body_part")
    body_part_aliases: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [name for name in self.fields if name not in FIELDS]
        if not self.fields or unknown or len(set(self.fields)) != len(self.fields):
            raise ValueError(
                f"cohort fields must be distinct names from {FIELDS}, got {self.fields}"
            )

    def key(self, modality: str | None, body_part: str | None, view: str | None = None) -> str:
        """The cohort of one image, e.g. ``CR/CHEST``."""
        parts = {
            "modality": normalise_modality(modality),
            "body_part": normalise_body_part(body_part, self.body_part_aliases),
            "view": normalise_view(view),
        }
        return "/".join(parts[name] for name in self.fields)

    def parse(self, text: str) -> str:
        """A cohort key typed by a person (``cr/Thorax``) in its normal form; ValueError if the
        number of parts does not match the configured fields."""
        parts = [part for part in text.strip().split("/")]
        if len(parts) != len(self.fields):
            raise ValueError(
                f"cohort {text!r} has {len(parts)} part(s); this configuration's cohorts are "
                + "/".join(self.fields)
            )
        values = dict(zip(self.fields, parts, strict=True))
        return self.key(values.get("modality"), values.get("body_part"), values.get("view"))
