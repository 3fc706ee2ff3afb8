"""The detector: verdicts for a batch of embedded images, and what the batch teaches the
reference sets. Built once per worker (``build_detector``) and handed to the embed service.

Two steps, because they have different failure costs. ``assess`` only reads (a cached snapshot
per cohort, a few matrix products) and its verdicts are stored in the same transaction as the
vectors, so an image is never stored without its verdict. ``learn`` runs after that commit and
offers the images to their cohorts' references; losing it to a crash only leaves a reference a
few images smaller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import redis

from pipeline.detect.cohort import CohortRule
from pipeline.detect.labels import PromptEmbeddings, TextEmbedder, header_label, judge, zero_shot
from pipeline.detect.reference import ReferenceStore
from pipeline.detect.scoring import Floats, knn_scores, p_values, unit_rows
from pipeline.embed.contract import EMBEDDING_DIM
from pipeline.records import ImageRecord
from pipeline.settings import DetectSettings, Settings
from pipeline.verdicts import SCORED, InstanceVerdict, LabelVerdict


@dataclass(frozen=True)
class Revision:
    """A stored verdict to rewrite: a reference image trimmed as a gross outlier, re-scored."""

    key: str  # the image's (pipeline.records.image_key)
    score: float
    p_value: float
    outlier: bool
    reference_size: int
    reference_version: int
    reason: str = "reference_trim"

    def apply(self, verdict: InstanceVerdict) -> InstanceVerdict:
        return replace(
            verdict,
            state=SCORED,
            score=self.score,
            p_value=self.p_value,
            outlier=self.outlier,
            reference_size=self.reference_size,
            reference_version=self.reference_version,
            reason=self.reason,
        )


class Detector:
    def __init__(
        self,
        settings: DetectSettings,
        references: ReferenceStore,
        prompts: PromptEmbeddings | None = None,
    ) -> None:
        self.settings = settings
        self.references = references
        self.prompts = prompts
        self.rule = cohort_rule(settings)

    def cohort_of(self, image: ImageRecord) -> str:
        return self.rule.key(image.modality, image.body_part, image.view)

    def _rows_by_cohort(self, images: Sequence[ImageRecord]) -> dict[str, list[int]]:
        """Cohort -> the indices of its images, cohorts in order of first appearance."""
        groups: dict[str, list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(self.cohort_of(image), []).append(i)
        return groups

    def assess(self, images: Sequence[ImageRecord], vectors: Floats) -> list[InstanceVerdict]:
        """One verdict per image (row-aligned with ``vectors``)."""
        unit = unit_rows(vectors)
        labels = self._labels(images, unit)
        verdicts: list[InstanceVerdict | None] = [None] * len(images)
        s = self.settings
        for cohort, rows in self._rows_by_cohort(images).items():
            snap = self.references.snapshot(cohort)
            scores = np.full(len(rows), np.nan)
            if snap.size:
                scores, _ = knn_scores(unit[rows], snap.vectors, s.k)
            p = p_values(scores, snap.loo_sorted) if snap.state == SCORED else scores * np.nan
            for j, i in enumerate(rows):
                verdicts[i] = InstanceVerdict(
                    image=images[i],
                    cohort=cohort,
                    state=snap.state,
                    score=float(scores[j]),
                    p_value=float(p[j]),
                    alpha=s.alpha,
                    k=s.k,
                    reference_size=snap.size,
                    reference_version=snap.version,
                    outlier=bool(p[j] < s.alpha),  # NaN compares False: no flag
                    label=labels[i],
                )
        return [v for v in verdicts if v is not None]

    def _labels(self, images: Sequence[ImageRecord], unit: Floats) -> list[LabelVerdict | None]:
        loaded = self.prompts.get() if self.prompts is not None else None
        if loaded is None or self.prompts is None:
            return [None] * len(images)
        texts, scale = loaded
        probabilities = zero_shot(unit, texts, scale)
        s = self.settings
        return [
            judge(
                row,
                self.prompts.labels,
                header_label(
                    image.modality, image.body_part, s.label_modalities, s.body_part_aliases
                ),
                s.label_margin,
            )
            for image, row in zip(images, probabilities, strict=True)
        ]

    def learn(self, images: Sequence[ImageRecord], vectors: Floats) -> list[Revision]:
        """Offer the images to their references; revisions for reference images trimmed now."""
        unit = unit_rows(vectors)
        revisions: list[Revision] = []
        for cohort, rows in self._rows_by_cohort(images).items():
            result = self.references.admit(cohort, unit[rows], [images[i].key for i in rows])
            after = result.snapshot
            revisions.extend(
                Revision(
                    key=t.uid,
                    score=t.score,
                    p_value=t.p_value,
                    outlier=bool(t.p_value < self.settings.alpha),
                    reference_size=after.size,
                    reference_version=after.version,
                )
                for t in result.trimmed
                if t.uid and not math.isnan(t.p_value)
            )
        return revisions


def reference_store(d: DetectSettings, connection: redis.Redis) -> ReferenceStore:
    """The cohorts' reference sets, as the settings size and score them."""
    return ReferenceStore(
        connection,
        k=d.k,
        min_reference=d.min_reference,
        max_reference=d.max_reference,
        trim_mads=d.trim_mads,
        dim=EMBEDDING_DIM,
    )


def cohort_rule(d: DetectSettings) -> CohortRule:
    """How a header becomes a cohort key, as the settings say."""
    return CohortRule(tuple(d.cohort_fields), dict(d.body_part_aliases))


def build_detector(
    settings: Settings, connection: redis.Redis, client: TextEmbedder | None
) -> Detector | None:
    """The detector the settings describe; None when ``detect.enabled`` is false."""
    d = settings.detect
    if not d.enabled:
        return None
    references = reference_store(d, connection)
    prompts = None
    url = settings.endpoint.url
    # `run` turns label_check off when it starts the local emulator, whose text and image
    # vectors are unrelated (every image would be a "mismatch"); decided there, once.
    if d.label_check and d.label_prompts and client is not None and url:
        prompts = PromptEmbeddings(
            connection, client, url, settings.endpoint.deployment, d.label_prompts
        )
    return Detector(d, references, prompts)
