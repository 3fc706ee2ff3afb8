"""The embeddings store: every L2-normalised vector kept by SOP Instance UID, with its series
and study, its verdict, and each series' embedding; exportable as one .npz.

Vectors live in Redis as raw little-endian float32 (4 KiB each), which keeps a million images in
~4 GiB and makes export a straight scan. A vector, its verdict, its series' running sum and its
"embedded" ledger transition are written in one MULTI, so a crash never leaves one without the
others; the series sum is read under WATCH and only counts an instance it has not counted yet,
so a redone batch cannot count an image twice.

Keys (besides the ledger's): see "Embeddings store" in pipeline/keys.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import redis

from pipeline.detect.verdict import GroupVerdict, InstanceVerdict, series_verdict, study_verdict
from pipeline.embed.contract import EMBEDDING_DIM
from pipeline.keys import (
    EMB_META,
    EMB_VECTORS,
    SERIES_VECTORS,
    VERDICTS,
    cohort_key,
    series_key,
    study_key,
)
from pipeline.ledger import Ledger

DTYPE = np.dtype("<f4")

#: Optimistic-transaction attempts when workers update one series at once; past this the job
#: fails transiently and rq retries it later.
MAX_SAVE_ATTEMPTS = 20


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

    def save(
        self, items: Sequence[Embedded], verdicts: Sequence[InstanceVerdict] | None = None
    ) -> None:
        """Store vectors (+ verdicts, series sums) and mark their instances embedded, atomically.

        Several frames of one instance share its SOP UID: the last one is what is kept.
        """
        if not items:
            return
        latest = {item.sop_instance_uid: item for item in items}
        for item in latest.values():
            vector = np.asarray(item.vector, dtype=DTYPE)
            if vector.ndim != 1 or not np.all(np.isfinite(vector)):
                raise ValueError(f"refusing to store a bad vector for {item.sop_instance_uid}")
        judged = {v.sop_instance_uid: v for v in verdicts or ()}
        by_series: dict[str, list[Embedded]] = {}
        for item in latest.values():
            by_series.setdefault(item.series_instance_uid, []).append(item)
        for _attempt in range(MAX_SAVE_ATTEMPTS):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    _watch(pipe, [series_key(uid) for uid in by_series])
                    sums = {uid: _series_sum(pipe, uid, group) for uid, group in by_series.items()}
                    pipe.multi()
                    for item in latest.values():
                        _stage_item(pipe, item, judged.get(item.sop_instance_uid))
                    for uid, (total, count, counted) in sums.items():
                        _stage_series(pipe, uid, by_series[uid][0].study_instance_uid, total, count)
                        if counted:
                            pipe.hset(series_key(uid), mapping={f"i:{s}": "1" for s in counted})
                    self.ledger.mark_embedded(pipe, list(latest))
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue
        raise redis.WatchError(f"series {sorted(by_series)} kept changing; retry the batch")

    def count(self) -> int:
        return int(self.redis.hlen(EMB_VECTORS))

    def get(self, sop_uid: str) -> np.ndarray | None:
        return self._vector(EMB_VECTORS, sop_uid)

    def series_vector(self, series_uid: str) -> np.ndarray | None:
        """The series embedding: the normalised mean of its images' vectors."""
        return self._vector(SERIES_VECTORS, series_uid)

    def _vector(self, key: str, field: str) -> np.ndarray | None:
        raw = self.redis.hget(key, field)
        return None if raw is None else np.frombuffer(cast(bytes, raw), dtype=DTYPE).copy()

    # -- verdicts -----------------------------------------------------------------------------
    def verdicts(self, sop_uids: Sequence[str]) -> list[InstanceVerdict | None]:
        if not sop_uids:
            return []
        raws = self.redis.hmget(VERDICTS, list(sop_uids))
        return [InstanceVerdict.from_json(json.loads(r)) if r else None for r in raws]

    def put_verdicts(self, verdicts: Sequence[InstanceVerdict]) -> None:
        """Overwrite stored verdicts (a reference trim revises them after the fact)."""
        if verdicts:
            mapping = {v.sop_instance_uid: json.dumps(v.to_json()) for v in verdicts}
            self.redis.hset(VERDICTS, mapping=mapping)  # type: ignore[arg-type]

    def series_verdict(self, series_uid: str) -> GroupVerdict | None:
        """Derived from the series' instance verdicts at read time (see verdict.py)."""
        return self._series_verdicts([series_uid])[0]

    def study_verdict(self, study_uid: str) -> GroupVerdict | None:
        series = sorted(_text(s) for s in self.redis.smembers(study_key(study_uid)))
        parts = [v for v in self._series_verdicts(series) if v is not None]
        return study_verdict(study_uid, parts) if parts else None

    def _series_verdicts(self, series_uids: Sequence[str]) -> list[GroupVerdict | None]:
        """Each series' verdict (None: no counted image) in two round trips, however many."""
        with self.redis.pipeline(transaction=False) as pipe:
            for uid in series_uids:
                pipe.hkeys(series_key(uid))
            members = [
                [f[2:] for f in map(_text, fields) if f.startswith("i:")]
                for fields in pipe.execute()
            ]
        found = iter(self.verdicts([sop for sops in members for sop in sops]))
        out: list[GroupVerdict | None] = []
        for uid, sops in zip(series_uids, members, strict=True):
            group = [v for v in (next(found) for _ in sops) if v is not None]
            out.append(series_verdict(uid, group) if sops else None)
        return out

    # -- reading in bulk ----------------------------------------------------------------------
    def vectors_in_chunks(
        self, sop_uids: Sequence[str] | None = None, chunk: int = 1000
    ) -> Iterator[tuple[list[str], npt.NDArray[np.float32]]]:
        """(UIDs, matrix) chunks of the stored vectors: all of them, or those of ``sop_uids``."""
        if sop_uids is None:
            uids: list[str] = []
            rows: list[bytes] = []
            for uid, raw in self.redis.hscan_iter(EMB_VECTORS, count=chunk):
                uids.append(_text(uid))
                rows.append(raw)
                if len(uids) >= chunk:
                    yield uids, _matrix(rows)
                    uids, rows = [], []
            if uids:
                yield uids, _matrix(rows)
            return
        for start in range(0, len(sop_uids), chunk):
            part = list(sop_uids[start : start + chunk])
            raws = self.redis.hmget(EMB_VECTORS, part)
            present = [(u, r) for u, r in zip(part, raws, strict=True) if r is not None]
            if present:
                yield [u for u, _ in present], _matrix([r for _, r in present])

    def cohort_members(self, cohort: str) -> list[str]:
        return sorted(_text(s) for s in self.redis.smembers(cohort_key(cohort)))

    def meta(self, sop_uids: Sequence[str]) -> list[dict[str, Any]]:
        raws = self.redis.hmget(EMB_META, list(sop_uids)) if sop_uids else []
        return [json.loads(r) if r else {} for r in raws]

    def export(self, path: Path) -> int:
        """Write everything to ``path`` (.npz), sorted by SOP UID: UIDs, vectors, verdict columns
        (``cohort``, ``outlier``, ``p_value`` NaN while unscored, ``label_mismatch``, ``score``,
        ``predicted_label``) and the series embeddings (``series_keys``, ``series_vectors``)."""
        uids: list[str] = []
        chunks: list[npt.NDArray[np.float32]] = []
        for part, matrix in self.vectors_in_chunks():
            uids.extend(part)
            chunks.append(matrix)
        order = np.argsort(np.array(uids, dtype=str)) if uids else np.array([], dtype=int)
        uids = [uids[i] for i in order]
        vectors = np.concatenate(chunks)[order] if chunks else _matrix([])
        columns = _columns(self, uids)
        series = sorted(_text(s) for s in self.redis.hkeys(SERIES_VECTORS))
        series_raw = self.redis.hmget(SERIES_VECTORS, series) if series else []
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            arrays: dict[str, Any] = {
                "sop_instance_uids": np.array(uids, dtype=str),
                "vectors": vectors.astype(np.float32),
                **columns,
                "series_keys": np.array(series, dtype=str),
                "series_vectors": _matrix(series_raw),
            }
            np.savez(handle, **arrays)
        return len(uids)


def _columns(store: EmbeddingStore, uids: list[str]) -> dict[str, npt.NDArray[Any]]:
    metas: list[dict[str, Any]] = []
    verdicts: list[InstanceVerdict | None] = []
    for start in range(0, len(uids), 1000):
        part = uids[start : start + 1000]
        metas.extend(store.meta(part))
        verdicts.extend(store.verdicts(part))
    return {
        "series_instance_uids": np.array([str(m.get("series", "")) for m in metas], dtype=str),
        "study_instance_uids": np.array([str(m.get("study", "")) for m in metas], dtype=str),
        "cohort": np.array([v.cohort if v else "" for v in verdicts], dtype=str),
        "outlier": np.array([bool(v and v.outlier) for v in verdicts], dtype=bool),
        "p_value": np.array([v.p_value if v else math.nan for v in verdicts], dtype=np.float64),
        "score": np.array([v.score if v else math.nan for v in verdicts], dtype=np.float64),
        "label_mismatch": np.array([bool(v and v.label_mismatch) for v in verdicts], dtype=bool),
        "predicted_label": np.array(
            [v.label.predicted_label if v and v.label else "" for v in verdicts], dtype=str
        ),
    }


def _series_sum(pipe: Any, uid: str, group: list[Embedded]) -> tuple[Any, int, list[str]]:
    """The series' running sum with the not-yet-counted images of ``group`` added."""
    raw = pipe.hmget(series_key(uid), ["sum", "count", *(f"i:{e.sop_instance_uid}" for e in group)])
    total = np.frombuffer(raw[0], dtype="<f8").copy() if raw[0] else np.zeros(len(group[0].vector))
    fresh = [e for e, seen in zip(group, raw[2:], strict=True) if seen is None]
    for item in fresh:
        total += np.asarray(item.vector, dtype=np.float64)
    return total, int(raw[1] or 0) + len(fresh), [e.sop_instance_uid for e in fresh]


def _stage_item(pipe: Any, item: Embedded, verdict: InstanceVerdict | None) -> None:
    uid = item.sop_instance_uid
    pipe.hset(EMB_VECTORS, uid, np.asarray(item.vector, dtype=DTYPE).tobytes())
    pipe.hset(EMB_META, uid, json.dumps(_meta(item)))
    if verdict is not None:
        pipe.hset(VERDICTS, uid, json.dumps(verdict.to_json()))
        pipe.sadd(cohort_key(verdict.cohort), uid)


def _stage_series(pipe: Any, uid: str, study: str, total: Any, count: int) -> None:
    norm = float(np.linalg.norm(total))
    pipe.hset(series_key(uid), mapping={"study": study, "sum": total.tobytes(), "count": count})
    if norm > 0:
        pipe.hset(SERIES_VECTORS, uid, (total / norm).astype(DTYPE).tobytes())
    pipe.sadd(study_key(study), uid)


def _watch(pipe: Any, keys: list[str]) -> None:
    """WATCH ``keys`` (redis-py leaves ``watch`` untyped)."""
    pipe.watch(*keys)


def _matrix(rows: Sequence[Any]) -> npt.NDArray[np.float32]:
    if not rows:
        return np.zeros((0, EMBEDDING_DIM), DTYPE)
    return np.frombuffer(b"".join(rows), dtype=DTYPE).reshape(len(rows), -1).copy()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _meta(item: Embedded) -> dict[str, object]:
    return {
        "study": item.study_instance_uid,
        "series": item.series_instance_uid,
        "modality": item.modality,
        "body_part": item.body_part,
        "frame": item.frame,
    }
