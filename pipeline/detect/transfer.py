"""Reference sets to and from files, for ``pacs-embed reference import|export``.

Format: ``.npz`` (numpy, no pickle) with

    vectors              (n, 1024) float         required
    cohort               str, one per row or one for all (or give ``--cohort``)
    sop_instance_uids    str per row             optional
    frame                int per row             optional (0): the frame of a multi-frame object
    outlier              bool per row            optional: flagged rows are not imported

so an ``embeddings export`` file imports as it is (its flagged images left out), and a
``reference export`` file imports back unchanged. Parquet would need pyarrow, which nothing else
here uses; convert such a file with ``pandas.read_parquet(...).to_numpy()`` and ``np.savez``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.detect.admission import Snapshot
from pipeline.detect.cohort import CohortRule
from pipeline.detect.reference import ReferenceStore
from pipeline.detect.scoring import Floats, scores_from_table, unit_rows
from pipeline.records import image_key, parse_image_key

#: Seed of the subsample taken when a file holds more vectors than ``max_reference``.
SUBSAMPLE_SEED = 0


@dataclass(frozen=True)
class Imported:
    cohort: str
    size: int
    version: int
    state: str
    skipped_flagged: int
    dropped_over_cap: int


def read_reference_file(
    path: Path, rule: CohortRule, cohort: str | None = None
) -> dict[str, tuple[Floats, list[str], int]]:
    """Cohort -> (unit vectors, image keys, flagged rows left out); ValueError names the
    problem."""
    if path.suffix.lower() == ".parquet":
        raise ValueError(
            "parquet needs pyarrow, which pacs-embed does not install; save the vectors as .npz"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"not a readable .npz file ({exc})") from exc
    if "vectors" not in arrays:
        raise ValueError(f"no 'vectors' array (found {sorted(arrays)})")
    vectors = np.asarray(arrays["vectors"])
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"'vectors' must be a non-empty 2-D array, got {vectors.shape}")
    n = vectors.shape[0]
    cohorts = _per_row(arrays.get("cohort"), n, "cohort")
    if cohort is not None:
        cohorts = [cohort] * n
    if cohorts is None:
        raise ValueError("no 'cohort' array; give --cohort")
    sops = _per_row(arrays.get("sop_instance_uids"), n, "sop_instance_uids") or [""] * n
    frames = _per_row(arrays.get("frame"), n, "frame") or ["0"] * n
    try:
        uids = [
            image_key(sop, int(frame)) if sop else ""
            for sop, frame in zip(sops, frames, strict=True)
        ]
    except ValueError as exc:
        raise ValueError("'frame' must hold integers") from exc
    flagged = np.asarray(arrays.get("outlier", np.zeros(n, bool)), dtype=bool).reshape(-1)
    unit = unit_rows(vectors)
    groups: dict[str, tuple[Floats, list[str], int]] = {}
    for name in sorted({rule.parse(c) for c in cohorts}):
        rows = np.array([rule.parse(c) == name for c in cohorts])
        keep = rows & ~flagged
        groups[name] = (
            unit[keep],
            [u for u, k in zip(uids, keep, strict=True) if k],
            int((rows & flagged).sum()),
        )
    return groups


def _per_row(value: Any, n: int, name: str) -> list[str] | None:
    if value is None:
        return None
    array = np.asarray(value).astype(str).reshape(-1)
    if array.size == 1:
        return [str(array[0])] * n
    if array.size != n:
        raise ValueError(f"'{name}' has {array.size} entries for {n} vectors")
    return [str(v) for v in array]


def import_references(
    store: ReferenceStore, groups: dict[str, tuple[Floats, list[str], int]]
) -> list[Imported]:
    """Replace each cohort's reference with the file's vectors (a seeded subsample when the
    file holds more than ``max_reference``: the cap bounds every worker's memory)."""
    cap = store.policy.max_reference
    out = []
    for cohort, (vectors, uids, flagged) in groups.items():
        if vectors.shape[0] == 0:
            continue
        dropped = max(0, vectors.shape[0] - cap)
        if dropped:
            rng = np.random.default_rng(SUBSAMPLE_SEED)
            pick = np.sort(rng.choice(vectors.shape[0], cap, replace=False))
            vectors, uids = vectors[pick], [uids[i] for i in pick]
        snap = store.replace(cohort, vectors, uids)
        out.append(Imported(cohort, snap.size, snap.version, snap.state, flagged, dropped))
    return out


def write_reference_file(path: Path, snapshots: list[Snapshot]) -> int:
    """Export references: the import columns plus each row's LOO score and the version."""
    present = [s for s in snapshots if s.size]
    dim = present[0].vectors.shape[1] if present else 1024
    ids = [parse_image_key(key) for s in present for key in s.uids]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez(
            handle,
            vectors=np.concatenate([s.vectors for s in present])
            if present
            else np.zeros((0, dim), np.float32),
            cohort=np.array([s.cohort for s in present for _ in range(s.size)], dtype=str),
            sop_instance_uids=np.array([sop for sop, _ in ids], dtype=str),
            frame=np.array([frame for _, frame in ids], dtype=int),
            loo_score=np.concatenate([scores_from_table(s.table) for s in present])
            if present
            else np.zeros(0),
            reference_version=np.array([s.version for s in present for _ in range(s.size)]),
        )
    return sum(s.size for s in present)
