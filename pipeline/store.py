"""The embeddings store: every L2-normalised vector kept per image, (SOP Instance UID, frame),
with its record (series, study, header fields), its verdict, and each series' embedding;
exportable as one .npz.

Vectors live in Redis as raw little-endian float32 (4 KiB each), which keeps a million images in
~4 GiB and makes export a straight scan. Each hash is keyed by the image key of
pipeline/records.py (the SOP UID for frame 0, ``<sop>/<frame>`` otherwise). A vector, its record,
its verdict, its series' running sum and the ledger's "embedded" transition are written in one
MULTI, so a crash never leaves one without the others; the series sum is read under WATCH and
only counts an image it has not counted yet, so a redone batch cannot count an image twice.

An instance is embedded once every frame its conversion selected (the ledger's ``frames``) is
stored, whichever batches carried them and in whatever order they finished: all frames of an
instance are in one series, and every save rewrites that series' key under WATCH, so two
batches of one instance never both miss each other's frames.

Keys (besides the ledger's): see "Embeddings store" in pipeline/keys.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import redis

from pipeline.embed.contract import EMBEDDING_DIM
from pipeline.keys import (
    EMB_META,
    EMB_VECTORS,
    SERIES_VECTORS,
    VERDICTS,
    cohort_key,
    series_key,
    study_key,
    text,
)
from pipeline.ledger import Ledger
from pipeline.records import ImageRecord, image_key, parse_image_key
from pipeline.verdicts import GroupVerdict, InstanceVerdict, series_verdict, study_verdict

DTYPE = np.dtype("<f4")

#: Optimistic-transaction attempts when workers update one series at once; past this the job
#: fails transiently and rq retries it later.
MAX_SAVE_ATTEMPTS = 20


class EmbeddingStore:
    def __init__(self, connection: redis.Redis, ledger: Ledger) -> None:
        self.redis = connection
        self.ledger = ledger

    def save(
        self,
        images: Sequence[ImageRecord],
        vectors: npt.ArrayLike,
        verdicts: Sequence[InstanceVerdict] | None = None,
    ) -> None:
        """Store vectors (row-aligned with ``images``), records, verdicts and series sums, and
        mark embedded the instances whose selected frames are now all stored, atomically."""
        if not images:
            return
        rows = np.asarray(vectors, dtype=DTYPE)
        if rows.ndim != 2 or rows.shape[0] != len(images):
            raise ValueError(f"{len(images)} images but vectors of shape {rows.shape}")
        latest: dict[str, tuple[ImageRecord, npt.NDArray[np.float32]]] = {}
        for image, row in zip(images, rows, strict=True):
            if not np.all(np.isfinite(row)):
                raise ValueError(f"refusing to store a bad vector for {image.key}")
            latest[image.key] = (image, row)
        judged = {v.image.key: v for v in verdicts or ()}
        self._commit(latest, judged, images)

    def settle(self, images: Sequence[ImageRecord]) -> None:
        """Mark embedded the instances of ``images`` (already stored) whose selected frames are
        all stored: a batch whose every image was stored before still completes its instances
        (e.g. the resend of an instance that failed after some of its frames were stored)."""
        embedded = self.ledger.embedded([image.sop_instance_uid for image in images])
        waiting = [image for image, done in zip(images, embedded, strict=True) if not done]
        if waiting:
            self._commit({}, {}, waiting)

    def _commit(
        self,
        latest: dict[str, tuple[ImageRecord, npt.NDArray[np.float32]]],
        judged: dict[str, InstanceVerdict],
        images: Sequence[ImageRecord],
    ) -> None:
        """Write ``latest`` and complete the instances of ``images``, in one transaction."""
        instances = _instances(images, self.ledger)
        series = sorted({instance.series_instance_uid for instance in instances.values()})
        for _attempt in range(MAX_SAVE_ATTEMPTS):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    _watch(pipe, [series_key(uid) for uid in series])
                    sums = {uid: _series_state(pipe, uid, latest, instances) for uid in series}
                    complete = sorted(sop for state in sums.values() for sop in state.complete)
                    newly = [
                        sop
                        for sop, already in zip(
                            complete, self.ledger.embedded(complete), strict=True
                        )
                        if not already
                    ]
                    if not latest and not newly:
                        return
                    pipe.multi()
                    for key, (image, row) in latest.items():
                        _stage_image(pipe, image, row, judged.get(key))
                    for uid, state in sums.items():
                        if state.fresh or set(state.complete) & set(newly):
                            state.stage(pipe, uid)
                    if newly:
                        self.ledger.mark_embedded(pipe, newly)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue
        raise redis.WatchError(f"series {series} kept changing; retry the batch")

    def forget(self, sop_uids: Sequence[str]) -> int:
        """Remove every stored image of these instances — vectors, records, verdicts, cohort
        membership, and their share of the series sums — so a corrected resend is embedded
        again (the worker skips what is stored). Returns the number of images removed.

        Reference sets keep what they learned from the old pixels: a reference is a sample of
        the cohort, and one image more or less in it does not change a verdict's calibration.
        """
        by_key = {
            image_key(sop, frame): sop
            for sop, frames in zip(
                sop_uids, self.ledger.selected_frames(list(sop_uids)), strict=True
            )
            for frame in (frames or (0,))
        }
        records = [r for r in self.records(list(by_key)) if r is not None]
        if not records:
            return 0
        series = sorted({r.series_instance_uid for r in records})
        for _attempt in range(MAX_SAVE_ATTEMPTS):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    _watch(pipe, [series_key(uid) for uid in series])
                    staged = [_unstage_series(pipe, uid, records) for uid in series]
                    pipe.multi()
                    for stage in staged:
                        stage(pipe)
                    for record in records:
                        pipe.hdel(EMB_VECTORS, record.key)
                        pipe.hdel(EMB_META, record.key)
                        pipe.hdel(VERDICTS, record.key)
                    for cohort in self._cohorts_of(records):
                        pipe.srem(cohort_key(cohort), *[r.key for r in records])
                    pipe.execute()
                    return len(records)
                except redis.WatchError:
                    continue
        raise redis.WatchError(f"series {series} kept changing; forget again")

    def _cohorts_of(self, records: Sequence[ImageRecord]) -> set[str]:
        return {v.cohort for v in self.verdicts([r.key for r in records]) if v is not None}

    def stored(self, keys: Sequence[str]) -> list[bool]:
        """For each image key: is its vector stored?"""
        if not keys:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hexists(EMB_VECTORS, key)
            return [bool(flag) for flag in pipe.execute()]

    def count(self) -> int:
        return int(self.redis.hlen(EMB_VECTORS))

    def get(self, sop_uid: str, frame: int | None = None) -> np.ndarray | None:
        """The vector of frame ``frame`` of an instance; with no frame given, of its first
        stored frame (frame 0, else the first of the frames its conversion selected)."""
        if frame is not None:
            return self._vector(EMB_VECTORS, image_key(sop_uid, frame))
        found = self._vector(EMB_VECTORS, sop_uid)
        if found is not None:
            return found
        keys = [image_key(sop_uid, f) for f in self.ledger.selected_frames([sop_uid])[0] or ()]
        raws = self.redis.hmget(EMB_VECTORS, keys) if keys else []
        raw = next((r for r in raws if r is not None), None)
        return None if raw is None else np.frombuffer(cast(bytes, raw), dtype=DTYPE).copy()

    def series_vector(self, series_uid: str) -> np.ndarray | None:
        """The series embedding: the normalised mean of its images' vectors."""
        return self._vector(SERIES_VECTORS, series_uid)

    def _vector(self, key: str, field: str) -> np.ndarray | None:
        raw = self.redis.hget(key, field)
        return None if raw is None else np.frombuffer(cast(bytes, raw), dtype=DTYPE).copy()

    # -- verdicts ---------------------------------------------------------------------------
    def verdicts(self, keys: Sequence[str]) -> list[InstanceVerdict | None]:
        """The verdicts of these image keys (None: stored without one, or not stored)."""
        if not keys:
            return []
        raws = self.redis.hmget(VERDICTS, list(keys))
        return [InstanceVerdict.from_json(json.loads(r)) if r else None for r in raws]

    def put_verdicts(self, verdicts: Sequence[InstanceVerdict]) -> None:
        """Overwrite stored verdicts (a reference trim revises them after the fact)."""
        if verdicts:
            mapping = {v.image.key: json.dumps(v.to_json()) for v in verdicts}
            self.redis.hset(VERDICTS, mapping=mapping)  # type: ignore[arg-type]

    def series_verdict(self, series_uid: str) -> GroupVerdict | None:
        """Derived from the series' image verdicts at read time (see pipeline/verdicts.py)."""
        return self._series_verdicts([series_uid])[0]

    def study_verdict(self, study_uid: str) -> GroupVerdict | None:
        series = sorted(text(s) for s in self.redis.smembers(study_key(study_uid)))
        parts = [v for v in self._series_verdicts(series) if v is not None]
        return study_verdict(study_uid, parts) if parts else None

    def _series_verdicts(self, series_uids: Sequence[str]) -> list[GroupVerdict | None]:
        """Each series' verdict (None: no counted image) in two round trips, however many."""
        with self.redis.pipeline(transaction=False) as pipe:
            for uid in series_uids:
                pipe.hkeys(series_key(uid))
            members = [
                [f[len(_COUNTED) :] for f in map(text, fields) if f.startswith(_COUNTED)]
                for fields in pipe.execute()
            ]
        found = iter(self.verdicts([key for keys in members for key in keys]))
        out: list[GroupVerdict | None] = []
        for uid, keys in zip(series_uids, members, strict=True):
            group = [v for v in (next(found) for _ in keys) if v is not None]
            out.append(series_verdict(uid, group) if keys else None)
        return out

    # -- reading in bulk ----------------------------------------------------------------------
    def vectors_in_chunks(
        self, keys: Sequence[str] | None = None, chunk: int = 1000
    ) -> Iterator[tuple[list[str], npt.NDArray[np.float32]]]:
        """(image keys, matrix) chunks of the stored vectors: all of them, or those of ``keys``."""
        if keys is None:
            found: list[str] = []
            rows: list[bytes] = []
            for key, raw in self.redis.hscan_iter(EMB_VECTORS, count=chunk):
                found.append(text(key))
                rows.append(raw)
                if len(found) >= chunk:
                    yield found, _matrix(rows)
                    found, rows = [], []
            if found:
                yield found, _matrix(rows)
            return
        for start in range(0, len(keys), chunk):
            part = list(keys[start : start + chunk])
            raws = self.redis.hmget(EMB_VECTORS, part)
            present = [(k, r) for k, r in zip(part, raws, strict=True) if r is not None]
            if present:
                yield [k for k, _ in present], _matrix([r for _, r in present])

    def cohort_members(self, cohort: str) -> list[str]:
        """The image keys of a cohort."""
        return sorted(text(s) for s in self.redis.smembers(cohort_key(cohort)))

    def records(self, keys: Sequence[str]) -> list[ImageRecord | None]:
        """The stored record of each image key (None: not stored)."""
        raws = self.redis.hmget(EMB_META, list(keys)) if keys else []
        return [
            _record(key, json.loads(raw)) if raw else None
            for key, raw in zip(keys, raws, strict=True)
        ]

    def export(self, path: Path, progress: ExportProgress | None = None) -> int:
        """Write everything to ``path`` (.npz), one row per image sorted by (SOP UID, frame):
        ``sop_instance_uids``, ``frame``, vectors, series and study UIDs, verdict columns
        (``cohort``, ``outlier``, ``p_value`` NaN while unscored, ``label_mismatch``, ``score``,
        ``predicted_label``) and the series embeddings (``series_keys``, ``series_vectors``).
        ``progress(phase, rows done, rows in all)`` is called after each chunk read."""
        report = progress or _no_progress
        total = self.count() if progress else 0
        keys: list[str] = []
        chunks: list[npt.NDArray[np.float32]] = []
        for part, matrix in self.vectors_in_chunks():
            keys.extend(part)
            chunks.append(matrix)
            report("vectors", len(keys), max(total, len(keys)))
        ids = [parse_image_key(key) for key in keys]
        order = sorted(range(len(keys)), key=ids.__getitem__)
        keys = [keys[i] for i in order]
        vectors = np.concatenate(chunks)[order] if chunks else _matrix([])
        columns = _columns(self, keys, report)
        series = sorted(text(s) for s in self.redis.hkeys(SERIES_VECTORS))
        series_raw = self.redis.hmget(SERIES_VECTORS, series) if series else []
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            arrays: dict[str, Any] = {
                "sop_instance_uids": np.array([ids[i][0] for i in order], dtype=str),
                "frame": np.array([ids[i][1] for i in order], dtype=np.int64),
                "vectors": vectors.astype(np.float32),
                **columns,
                "series_keys": np.array(series, dtype=str),
                "series_vectors": _matrix(series_raw),
            }
            np.savez(handle, **arrays)
        return len(keys)


#: ``EmbeddingStore.export``'s progress callback: (phase, rows done, rows in all).
ExportProgress = Callable[[str, int, int], None]


def _no_progress(_phase: str, _done: int, _total: int) -> None:
    pass


def _columns(
    store: EmbeddingStore, keys: list[str], progress: ExportProgress = _no_progress
) -> dict[str, npt.NDArray[Any]]:
    records: list[ImageRecord | None] = []
    verdicts: list[InstanceVerdict | None] = []
    for start in range(0, len(keys), 1000):
        part = keys[start : start + 1000]
        records.extend(store.records(part))
        verdicts.extend(store.verdicts(part))
        progress("records", len(records), len(keys))
    return {
        "series_instance_uids": np.array(
            [r.series_instance_uid if r else "" for r in records], dtype=str
        ),
        "study_instance_uids": np.array(
            [r.study_instance_uid if r else "" for r in records], dtype=str
        ),
        "cohort": np.array([v.cohort if v else "" for v in verdicts], dtype=str),
        "outlier": np.array([bool(v and v.outlier) for v in verdicts], dtype=bool),
        "p_value": np.array([v.p_value if v else math.nan for v in verdicts], dtype=np.float64),
        "score": np.array([v.score if v else math.nan for v in verdicts], dtype=np.float64),
        "label_mismatch": np.array([bool(v and v.label_mismatch) for v in verdicts], dtype=bool),
        "predicted_label": np.array(
            [v.label.predicted_label if v and v.label else "" for v in verdicts], dtype=str
        ),
    }


#: A series hash field naming an image counted in its sum: ``i:<image key>``.
_COUNTED = "i:"


@dataclass(frozen=True)
class _Instance:
    """An instance a save touches: its series and study, and the image keys of the frames its
    conversion selected (the ledger's ``frames``; unrecorded: the frames in hand)."""

    series_instance_uid: str
    study_instance_uid: str
    keys: tuple[str, ...]


def _instances(images: Sequence[ImageRecord], ledger: Ledger) -> dict[str, _Instance]:
    """SOP UID -> :class:`_Instance`, for the instances of ``images``."""
    in_hand: dict[str, list[ImageRecord]] = {}
    for image in images:
        in_hand.setdefault(image.sop_instance_uid, []).append(image)
    selected = ledger.selected_frames(list(in_hand))
    out: dict[str, _Instance] = {}
    for (sop, mine), frames in zip(in_hand.items(), selected, strict=True):
        keys = [image_key(sop, f) for f in frames] if frames else [i.key for i in mine]
        first = mine[0]
        out[sop] = _Instance(first.series_instance_uid, first.study_instance_uid, tuple(keys))
    return out


@dataclass(frozen=True)
class _SeriesState:
    """One series as a save leaves it: its running sum with the images it had not counted
    added, and the instances whose selected frames are then all counted."""

    study: str
    total: npt.NDArray[np.float64] | None  # None: nothing counted yet
    count: int
    fresh: tuple[str, ...]
    complete: tuple[str, ...]

    def stage(self, pipe: Any, uid: str) -> None:
        """Write the series: whenever a save counts an image or completes an instance, since a
        write to the watched key is what orders two saves of one instance's frames."""
        counted = {f"{_COUNTED}{k}": "1" for k in self.fresh}
        pipe.hset(series_key(uid), mapping={"study": self.study, "count": self.count, **counted})
        if self.total is not None:
            pipe.hset(series_key(uid), "sum", self.total.tobytes())
            norm = float(np.linalg.norm(self.total))
            if norm > 0:
                pipe.hset(SERIES_VECTORS, uid, (self.total / norm).astype(DTYPE).tobytes())
        pipe.sadd(study_key(self.study), uid)


def _series_state(
    pipe: Any,
    uid: str,
    latest: dict[str, tuple[ImageRecord, npt.NDArray[np.float32]]],
    instances: dict[str, _Instance],
) -> _SeriesState:
    """Read series ``uid`` (under WATCH) and add the images of ``latest`` it has not counted."""
    mine = {k: row for k, (image, row) in latest.items() if image.series_instance_uid == uid}
    members = {sop: i for sop, i in instances.items() if i.series_instance_uid == uid}
    asked = list(dict.fromkeys([*mine, *(k for i in members.values() for k in i.keys)]))
    raw = pipe.hmget(series_key(uid), ["sum", "count", *(f"{_COUNTED}{k}" for k in asked)])
    counted = {k for k, seen in zip(asked, raw[2:], strict=True) if seen is not None}
    fresh = [k for k in mine if k not in counted]
    total = np.frombuffer(raw[0], dtype="<f8").copy() if raw[0] else None
    for key in fresh:
        row = np.asarray(mine[key], dtype=np.float64)
        total = row if total is None else total + row
    return _SeriesState(
        study=next(iter(members.values())).study_instance_uid,
        total=total,
        count=int(raw[1] or 0) + len(fresh),
        fresh=tuple(fresh),
        complete=tuple(
            sop for sop, i in members.items() if all(k in counted or k in mine for k in i.keys)
        ),
    )


def _unstage_series(pipe: Any, uid: str, records: Sequence[ImageRecord]) -> Any:
    """Read series ``uid`` (under WATCH); return what writes it back without ``records``."""
    mine = [r.key for r in records if r.series_instance_uid == uid]
    raw = pipe.hmget(series_key(uid), ["sum", "count", *(f"{_COUNTED}{k}" for k in mine)])
    counted = [k for k, seen in zip(mine, raw[2:], strict=True) if seen is not None]
    rows = pipe.hmget(EMB_VECTORS, counted) if counted else []
    total = np.frombuffer(raw[0], dtype="<f8").copy() if raw[0] else None
    for row in rows:
        if row is not None and total is not None:
            total -= np.frombuffer(row, dtype=DTYPE).astype(np.float64)
    count = max(0, int(raw[1] or 0) - len(counted))

    def stage(p: Any) -> None:
        if counted:
            p.hdel(series_key(uid), *(f"{_COUNTED}{k}" for k in counted))
        p.hset(series_key(uid), "count", count)
        if total is not None and count > 0:
            p.hset(series_key(uid), "sum", total.tobytes())
            norm = float(np.linalg.norm(total))
            if norm > 0:
                p.hset(SERIES_VECTORS, uid, (total / norm).astype(DTYPE).tobytes())
        elif count == 0:
            p.hdel(series_key(uid), "sum")
            p.hdel(SERIES_VECTORS, uid)

    return stage


def _stage_image(
    pipe: Any, image: ImageRecord, row: npt.NDArray[np.float32], verdict: InstanceVerdict | None
) -> None:
    key = image.key
    pipe.hset(EMB_VECTORS, key, np.asarray(row, dtype=DTYPE).tobytes())
    pipe.hset(EMB_META, key, json.dumps(image.to_dict()))
    if verdict is not None:
        pipe.hset(VERDICTS, key, json.dumps(verdict.to_json()))
        pipe.sadd(cohort_key(verdict.cohort), key)


def _record(key: str, doc: dict[str, Any]) -> ImageRecord:
    """A stored record; one written before records (``{study, series, modality, ...}``) too."""
    if "sop_instance_uid" in doc:
        return ImageRecord.from_dict(doc)
    sop, frame = parse_image_key(key)
    return ImageRecord.from_dict(
        {
            **doc,
            "sop_instance_uid": sop,
            "frame": frame,
            "study_instance_uid": doc.get("study", ""),
            "series_instance_uid": doc.get("series", ""),
        }
    )


def _watch(pipe: Any, keys: list[str]) -> None:
    """WATCH ``keys`` (redis-py leaves ``watch`` untyped)."""
    pipe.watch(*keys)


def _matrix(rows: Sequence[Any]) -> npt.NDArray[np.float32]:
    if not rows:
        return np.zeros((0, EMBEDDING_DIM), DTYPE)
    return np.frombuffer(b"".join(rows), dtype=DTYPE).reshape(len(rows), -1).copy()
