"""Nearest stored images to a query vector, by cosine similarity: brute force over the store.

Used by ``pacs-embed search`` and the admin ``/search`` route. Vectors are read from Redis in
chunks of 1,000 (4 MB) and only a running top-N is kept, so memory stays flat; the cost is one
pass over the store (or over one cohort's members), which is fine for an operator's query up to
a few hundred thousand images. A per-query ANN index would pay only beyond that.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pipeline.detect.scoring import unit_rows
from pipeline.records import FRAME_SEPARATOR, ImageRecord, parse_image_key
from pipeline.verdicts import InstanceVerdict

#: Most hits a query may ask for.
MAX_TOP = 1000


class StoredImages(Protocol):
    """What a search reads from the embeddings store (``pipeline.store.EmbeddingStore``, handed
    in by the caller: this package does not import the store)."""

    def cohort_members(self, cohort: str) -> list[str]: ...

    def vectors_in_chunks(
        self, keys: Sequence[str] | None = None, chunk: int = 1000
    ) -> Iterator[tuple[list[str], npt.NDArray[np.float32]]]: ...

    def records(self, keys: Sequence[str]) -> list[ImageRecord | None]: ...

    def verdicts(self, keys: Sequence[str]) -> list[InstanceVerdict | None]: ...


@dataclass(frozen=True)
class Hit:
    image: ImageRecord
    cohort: str
    similarity: float

    def to_json(self) -> dict[str, Any]:
        """The image's record (``sop_instance_uid``, ``frame``, ...), cohort and similarity."""
        return {**self.image.to_dict(), "cohort": self.cohort, "similarity": self.similarity}


def nearest(
    store: StoredImages,
    query: npt.ArrayLike,
    *,
    top: int = 10,
    cohort: str | None = None,
    exclude: str | None = None,
) -> list[Hit]:
    """The ``top`` stored images most similar to ``query`` (most similar first).

    ``cohort`` restricts the search to images whose verdict put them in that cohort; ``exclude``
    leaves out every frame of one SOP Instance UID (the query image's instance).
    """
    if not 1 <= top <= MAX_TOP:
        raise ValueError(f"top must be between 1 and {MAX_TOP}, got {top}")
    q = unit_rows(query)[0]
    members = store.cohort_members(cohort) if cohort else None
    best_keys: list[str] = []
    best_sims = np.empty(0, dtype=np.float32)
    for keys, matrix in store.vectors_in_chunks(members):
        sims = matrix @ q
        if exclude is not None:
            frames_of = f"{exclude}{FRAME_SEPARATOR}"
            for i, key in enumerate(keys):
                if key == exclude or key.startswith(frames_of):
                    sims[i] = -np.inf
        merged_keys = best_keys + keys
        merged = np.concatenate([best_sims, sims])
        keep = np.argsort(-merged, kind="stable")[:top]
        keep = keep[np.isfinite(merged[keep])]
        best_keys = [merged_keys[i] for i in keep]
        best_sims = merged[keep]
    records = store.records(best_keys)
    verdicts = store.verdicts(best_keys)
    return [
        Hit(
            image=record or _bare(key),
            cohort=verdict.cohort if verdict else "",
            similarity=round(float(sim), 6),
        )
        for key, sim, record, verdict in zip(best_keys, best_sims, records, verdicts, strict=True)
    ]


def _bare(key: str) -> ImageRecord:
    """A hit whose record is gone (deleted by hand): its identity only."""
    sop, frame = parse_image_key(key)
    return ImageRecord(
        sop_instance_uid=sop, frame=frame, study_instance_uid="", series_instance_uid=""
    )
