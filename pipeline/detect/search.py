"""Nearest stored images to a query vector, by cosine similarity: brute force over the store.

Used by ``pacs-embed search`` and the admin ``/search`` route. Vectors are read from Redis in
chunks of 1,000 (4 MB) and only a running top-N is kept, so memory stays flat; the cost is one
pass over the store (or over one cohort's members), which is fine for an operator's query up to
a few hundred thousand images. A per-query ANN index would pay only beyond that.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.detect.scoring import unit_rows
from pipeline.store import EmbeddingStore

#: Most hits a query may ask for.
MAX_TOP = 1000


@dataclass(frozen=True)
class Hit:
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    cohort: str
    similarity: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def nearest(
    store: EmbeddingStore,
    query: npt.ArrayLike,
    *,
    top: int = 10,
    cohort: str | None = None,
    exclude: str | None = None,
) -> list[Hit]:
    """The ``top`` stored images most similar to ``query`` (most similar first).

    ``cohort`` restricts the search to images whose verdict put them in that cohort; ``exclude``
    leaves one SOP UID out (the query image itself).
    """
    if not 1 <= top <= MAX_TOP:
        raise ValueError(f"top must be between 1 and {MAX_TOP}, got {top}")
    q = unit_rows(query)[0]
    members = store.cohort_members(cohort) if cohort else None
    best_uids: list[str] = []
    best_sims = np.empty(0, dtype=np.float32)
    for uids, matrix in store.vectors_in_chunks(members):
        sims = matrix @ q
        if exclude is not None and exclude in uids:
            sims[uids.index(exclude)] = -np.inf
        merged_uids = best_uids + uids
        merged = np.concatenate([best_sims, sims])
        keep = np.argsort(-merged, kind="stable")[:top]
        keep = keep[np.isfinite(merged[keep])]
        best_uids = [merged_uids[i] for i in keep]
        best_sims = merged[keep]
    metas = store.meta(best_uids)
    verdicts = store.verdicts(best_uids)
    return [
        Hit(
            sop_instance_uid=uid,
            series_instance_uid=str(meta.get("series", "")),
            study_instance_uid=str(meta.get("study", "")),
            cohort=verdict.cohort if verdict else "",
            similarity=round(float(sim), 6),
        )
        for uid, sim, meta, verdict in zip(best_uids, best_sims, metas, verdicts, strict=True)
    ]
