"""What an embed job does: batch -> endpoint -> vectors -> verdicts -> store. No rq in here.

Idempotent per image, (SOP Instance UID, frame): images the store already has are dropped before
the endpoint is called, so a batch redone after a crash costs nothing twice and stores nothing
twice, while other frames of the same instance, in this batch or another, are still embedded.
The instance is marked embedded by the store once all its selected frames are stored.

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
from pipeline.errors import PermanentEndpointError
from pipeline.jobs import EmbedBatch, ImageItem
from pipeline.ledger import Ledger, Stage
from pipeline.records import ImageRecord
from pipeline.stage_metrics import StageMetrics
from pipeline.store import EmbeddingStore
from pipeline.verdicts import InstanceVerdict

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
        metrics: StageMetrics | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.ledger = ledger
        self.detector = detector
        self.metrics = metrics

    def run(self, batch: EmbedBatch) -> Outcome:
        """Embed what is not embedded yet. Transient endpoint errors propagate (rq retries)."""
        todo, done = self._split(batch)
        already = len(done)
        if not todo:
            saved, failed = 0, 0
        else:
            try:
                saved, failed = self._embed(todo), 0
            except PermanentEndpointError as exc:
                if len(todo) == 1:
                    self._fail(todo, f"endpoint: {exc}")
                    saved, failed = 0, 1
                else:  # one bad image must not take its 15 neighbours down: isolate it
                    saved, failed = self._one_by_one(todo)
        if already:
            # Instances none of whose images were new here (a redone batch, a resend) may still
            # be complete; those with a new image were settled by their save.
            fresh = {item.image.sop_instance_uid for item in todo}
            self.store.settle(
                [item.image for item in done if item.image.sop_instance_uid not in fresh]
            )
        return Outcome(saved, already, failed)

    def _embed(self, items: list[ImageItem]) -> int:
        images = [item.image for item in items]
        vectors = self.client.embed_images([item.png for item in items])
        verdicts = self._assess(images, vectors)
        self.store.save(images, vectors, verdicts)
        if verdicts and self.metrics is not None:  # after the save: a redone batch skips them
            self.metrics.flagged(
                {
                    "outlier": sum(v.outlier for v in verdicts),
                    "label_mismatch": sum(v.label_mismatch for v in verdicts),
                }
            )
        self._learn(images, vectors)
        return len(items)

    def _assess(
        self, images: list[ImageRecord], vectors: np.ndarray
    ) -> list[InstanceVerdict] | None:
        if self.detector is None:
            return None
        try:
            verdicts = self.detector.assess(images, vectors)
        except Exception as exc:  # never lose an embedding to a detection bug or outage
            log.exception("detect.failed", step="assess", error=type(exc).__name__)
            return None
        flagged = [v.image.key for v in verdicts if v.outlier or v.label_mismatch]
        if flagged:
            log.info("detect.flagged", images=len(flagged), image_keys=flagged)
        return verdicts

    def _learn(self, images: list[ImageRecord], vectors: np.ndarray) -> None:
        """Grow the references after the commit; revise verdicts a reference trim changed."""
        if self.detector is None:
            return
        try:
            revisions = self.detector.learn(images, vectors)
            if revisions:
                stored = self.store.verdicts([r.key for r in revisions])
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
                self._fail([item], f"endpoint: {exc}")
                failed += 1
        return saved, failed

    def _fail(self, items: list[ImageItem], reason: str) -> None:
        """Quarantine the instances of ``items``: one frame that cannot be embedded fails its
        instance (its other frames stay stored; it is never complete)."""
        sop_uids = list(dict.fromkeys(item.image.sop_instance_uid for item in items))
        for sop_uid in sop_uids:
            self.ledger.failed(sop_uid, Stage.EMBED, reason)
        log.warning(
            "embed.quarantined",
            images=len(items),
            reason=reason,
            image_keys=[item.image.key for item in items],
        )

    def give_up(self, batch: EmbedBatch, reason: str) -> None:
        """The job will not run again (its last retry failed transiently, or it kept killing its
        worker): record why for what it has not stored, so its instances are final."""
        todo = self._split(batch)[0]
        if todo:
            self._fail(todo, reason)

    def _split(self, batch: EmbedBatch) -> tuple[list[ImageItem], list[ImageItem]]:
        """(to embed, already stored): the store decides, by image key (idempotent)."""
        stored = self.store.stored([image.key for image in batch.images])
        pairs = list(zip(batch.items, stored, strict=True))
        return [item for item, have in pairs if not have], [item for item, have in pairs if have]
