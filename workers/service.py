"""What an embed job does: batch -> endpoint -> vectors -> verdicts -> store. No rq in here.

Idempotent by SOP Instance UID: images the store already has are dropped before the endpoint is
called, so a batch redone after a crash costs nothing twice and stores nothing twice.

Verdicts (pipeline/detect) are computed before the store's transaction and written in it, so an
embedded image always has its verdict; the references learn from the batch after the commit. A
bug or outage in detection never costs an embedding: the batch is then stored without verdicts
and the failure logged (``detect.failed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import structlog

from pipeline.detect.detector import Detector
from pipeline.detect.verdict import InstanceVerdict
from pipeline.errors import PermanentEndpointError
from pipeline.jobs import EmbedBatch, ImageItem
from pipeline.ledger import Ledger, Stage
from pipeline.store import Embedded, EmbeddingStore

log = structlog.get_logger(__name__)


class ImageEmbedder(Protocol):
    def embed_images(self, pngs: list[bytes]) -> np.ndarray: ...


@dataclass(frozen=True)
class Outcome:
    embedded: int
    already: int
    failed: int

    def as_dict(self) -> dict[str, int]:
        return {"embedded": self.embedded, "already": self.already, "failed": self.failed}


class EmbedService:
    def __init__(
        self,
        client: ImageEmbedder,
        store: EmbeddingStore,
        ledger: Ledger,
        detector: Detector | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.ledger = ledger
        self.detector = detector

    def run(self, batch: EmbedBatch) -> Outcome:
        """Embed what is not embedded yet. Transient endpoint errors propagate (rq retries)."""
        done = self.ledger.embedded(batch.sop_uids)
        todo = [item for item, is_done in zip(batch.items, done, strict=True) if not is_done]
        if not todo:
            return Outcome(0, len(batch.items), 0)
        try:
            saved, failed = self._embed(todo), 0
        except PermanentEndpointError as exc:
            if len(todo) == 1:
                self._fail(todo, exc)
                return Outcome(0, len(batch.items) - len(todo), len(todo))
            # One bad image must not take its 15 neighbours down: isolate it.
            saved, failed = self._one_by_one(todo)
        return Outcome(saved, len(batch.items) - len(todo), failed)

    def _embed(self, items: list[ImageItem]) -> int:
        vectors = self.client.embed_images([item.png for item in items])
        self.store.save(
            [
                Embedded(
                    sop_instance_uid=item.sop_instance_uid,
                    series_instance_uid=item.series_instance_uid,
                    study_instance_uid=item.study_instance_uid,
                    modality=item.modality,
                    body_part=item.body_part,
                    frame=item.frame,
                    vector=vector,
                )
                for item, vector in zip(items, vectors, strict=True)
            ],
            self._assess(items, vectors),
        )
        self._learn(items, vectors)
        return len(items)

    def _assess(self, items: list[ImageItem], vectors: np.ndarray) -> list[InstanceVerdict] | None:
        if self.detector is None:
            return None
        try:
            verdicts = self.detector.assess(items, vectors)
        except Exception as exc:  # never lose an embedding to a detection bug or outage
            log.exception("detect.failed", step="assess", error=type(exc).__name__)
            return None
        flagged = [v.sop_instance_uid for v in verdicts if v.outlier or v.label_mismatch]
        if flagged:
            log.info("detect.flagged", images=len(flagged), sop_instance_uids=flagged)
        return verdicts

    def _learn(self, items: list[ImageItem], vectors: np.ndarray) -> None:
        """Grow the references after the commit; revise verdicts a reference trim changed."""
        if self.detector is None:
            return
        try:
            revisions = self.detector.learn(items, vectors)
            if revisions:
                stored = self.store.verdicts([r.sop_instance_uid for r in revisions])
                self.store.put_verdicts(
                    [r.apply(v) for r, v in zip(revisions, stored, strict=True) if v is not None]
                )
                log.info("detect.reference_trimmed", images=len(revisions))
        except Exception as exc:
            log.exception("detect.failed", step="learn", error=type(exc).__name__)

    def _one_by_one(self, items: list[ImageItem]) -> tuple[int, int]:
        saved = failed = 0
        for item in items:
            try:
                saved += self._embed([item])
            except PermanentEndpointError as exc:
                self._fail([item], exc)
                failed += 1
        return saved, failed

    def _fail(self, items: list[ImageItem], exc: Exception) -> None:
        reason = f"endpoint: {exc}"
        for item in items:
            self.ledger.failed(item.sop_instance_uid, Stage.EMBED, reason)
        log.warning(
            "embed.quarantined",
            images=len(items),
            reason=reason,
            sop_instance_uids=[item.sop_instance_uid for item in items],
        )

    def give_up(self, batch: EmbedBatch, exc: Exception) -> None:
        """The job's last retry failed transiently: record why, so the instances are final."""
        pending = [
            i
            for i, d in zip(batch.items, self.ledger.embedded(batch.sop_uids), strict=True)
            if not d
        ]
        self._fail(pending, exc)
