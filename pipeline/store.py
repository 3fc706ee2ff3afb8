"""The embeddings store: every L2-normalised vector kept by SOP Instance UID, with its series
and study, exportable as one .npz.

Vectors live in Redis as raw little-endian float32 (4 KiB each), which keeps a million images in
~4 GiB and makes export a straight scan. A vector and its "embedded" ledger transition are
written in one MULTI, so a crash never leaves one without the other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import redis

from pipeline.ledger import PREFIX, Ledger

VECTORS = f"{PREFIX}:emb:vec"  # hash sop -> float32 bytes
META = f"{PREFIX}:emb:meta"  # hash sop -> json {study, series, modality, body_part, frame}
DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class Embedded:
    """One stored embedding and the identifiers it is kept by (no PHI)."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part: str
    frame: int
    vector: np.ndarray


class EmbeddingStore:
    def __init__(self, connection: redis.Redis, ledger: Ledger) -> None:
        self.redis = connection
        self.ledger = ledger

    def save(self, items: Sequence[Embedded]) -> None:
        """Store vectors and mark their instances embedded, atomically."""
        if not items:
            return
        with self.redis.pipeline(transaction=True) as pipe:
            for item in items:
                vector = np.asarray(item.vector, dtype=DTYPE)
                if vector.ndim != 1 or not np.all(np.isfinite(vector)):
                    raise ValueError(f"refusing to store a bad vector for {item.sop_instance_uid}")
                pipe.hset(VECTORS, item.sop_instance_uid, vector.tobytes())
                pipe.hset(META, item.sop_instance_uid, json.dumps(_meta(item)))
            self.ledger.mark_embedded(pipe, [item.sop_instance_uid for item in items])
            pipe.execute()

    def count(self) -> int:
        return int(self.redis.hlen(VECTORS))

    def get(self, sop_uid: str) -> np.ndarray | None:
        raw = self.redis.hget(VECTORS, sop_uid)
        return None if raw is None else np.frombuffer(cast(bytes, raw), dtype=DTYPE).copy()

    def scan(self, chunk: int = 1000) -> Iterator[tuple[str, np.ndarray, dict[str, object]]]:
        """Every stored (sop_uid, vector, meta), in no particular order."""
        for uid, raw in self.redis.hscan_iter(VECTORS, count=chunk):
            meta_raw = self.redis.hget(META, uid)
            meta = json.loads(meta_raw) if meta_raw else {}
            yield uid.decode(), np.frombuffer(raw, dtype=DTYPE), meta

    def export(self, path: Path) -> int:
        """Write everything to ``path`` (.npz): sop_instance_uids, series/study UIDs, vectors."""
        uids: list[str] = []
        series: list[str] = []
        studies: list[str] = []
        vectors: list[np.ndarray] = []
        for uid, vector, meta in self.scan():
            uids.append(uid)
            series.append(str(meta.get("series", "")))
            studies.append(str(meta.get("study", "")))
            vectors.append(vector)
        order = np.argsort(np.array(uids, dtype=str)) if uids else np.array([], dtype=int)
        matrix = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, 1024), "f4")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            np.savez(
                handle,
                sop_instance_uids=np.array(uids, dtype=str)[order],
                series_instance_uids=np.array(series, dtype=str)[order],
                study_instance_uids=np.array(studies, dtype=str)[order],
                vectors=matrix[order],
            )
        return len(uids)


def _meta(item: Embedded) -> dict[str, object]:
    return {
        "study": item.study_instance_uid,
        "series": item.series_instance_uid,
        "modality": item.modality,
        "body_part": item.body_part,
        "frame": item.frame,
    }
