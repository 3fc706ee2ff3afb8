"""Which images join a cohort's reference set, decided in pure numpy over an in-memory snapshot.

Policy (the reasons are calibration, not convenience):

* **Bootstrap.** Until the reference holds ``min_reference`` images every new image joins and
  nothing is flagged. When it first reaches ``min_reference``, gross outliers are trimmed
  (``scoring.trim_bootstrap``) and the set becomes ``scored``; trimmed images are re-scored
  against the trimmed reference so that they can be flagged after all.
* **Re-checks.** The same trim runs again each time the reference doubles (200, 400, 800, ...)
  and when it reaches ``max_reference``. At n ~ 100 the normal scores spread so widely that a
  pair of identical blank frames (each the other's nearest neighbour) can sit under the limit;
  the spread shrinks as n grows, so what a small bootstrap let in is caught at a later check.
  A check that trims nothing costs no rebuild; one that trims rebuilds the table (O(n^2 d):
  0.1 s at 2,000, ~25 s at 50,000 on two cores) and revises the trimmed images' verdicts.
* **Growth.** A scored reference keeps taking images until ``max_reference``, but only those
  whose score is within the same robust limit the trim uses. Admitting only *unflagged* images
  (p >= alpha) would be the obvious rule and a wrong one: it removes the top alpha of normal
  scores from every generation of the reference, which thins the tail the p-values are ranked
  against and lets the false-flag rate creep above alpha. The robust limit only keeps out what
  is grossly unlike the cohort, so the reference stays a fair sample of its normal images.
* **Full.** At ``max_reference`` the reference is frozen (replace it by import to refresh it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.detect.scoring import (
    Doubles,
    Floats,
    extend_table,
    knn_scores,
    neighbour_table,
    p_values,
    robust_limit,
    scores_from_table,
    top_k,
    trim_bootstrap,
    unit_rows,
)
from pipeline.verdicts import BOOTSTRAP, SCORED


@dataclass(frozen=True)
class Policy:
    k: int
    min_reference: int
    max_reference: int
    trim_mads: float


@dataclass(frozen=True)
class Trimmed:
    """A bootstrap image removed as a gross outlier, scored against the trimmed reference."""

    uid: str
    score: float
    p_value: float


class Snapshot:
    """One version of a cohort's reference: vectors, neighbour table, sorted LOO scores.

    Rows live in a buffer with spare capacity, so appending b rows copies b rows, not n.
    """

    def __init__(
        self,
        cohort: str,
        generation: str,
        version: int,
        state: str,
        buffer: Floats,
        size: int,
        uids: list[str],
        table: Floats,
        policy: Policy,
    ) -> None:
        self.cohort = cohort
        self.generation = generation
        self.version = version
        self.state = state
        self.size = size
        self.uids = uids
        self.uid_set = frozenset(u for u in uids if u)
        self.table = table
        self.policy = policy
        self._buffer = buffer
        scores = scores_from_table(table)
        self.loo_sorted: Doubles = np.sort(scores[np.isfinite(scores)])
        self.limit = robust_limit(self.loo_sorted, policy.trim_mads)

    @property
    def vectors(self) -> Floats:
        return self._buffer[: self.size]

    @classmethod
    def empty(cls, cohort: str, dim: int, policy: Policy) -> Snapshot:
        none = np.empty((0, dim), np.float32)
        return cls(
            cohort, "", 0, BOOTSTRAP, none, 0, [], np.empty((0, policy.k), np.float32), policy
        )

    @classmethod
    def build(
        cls,
        cohort: str,
        generation: str,
        version: int,
        state: str,
        base: Snapshot | None,
        rows: Floats,
        uids: Sequence[str],
        table: Floats | None,
        policy: Policy,
    ) -> Snapshot:
        """``base``'s rows plus ``rows`` (base None: ``rows`` alone); a table of another k (None)
        is recomputed here."""
        start = base.size if base is not None else 0
        size = start + rows.shape[0]
        dim = rows.shape[1]
        buffer = base._buffer if base is not None else np.empty((0, dim), np.float32)
        if size > buffer.shape[0]:
            grown = np.empty((max(size, 2 * buffer.shape[0], 64), dim), np.float32)
            grown[:start] = buffer[:start]
            buffer = grown
        buffer[start:size] = rows
        names = (base.uids if base is not None else []) + list(uids)
        if table is None or table.shape[0] != size:
            table = neighbour_table(buffer[:size], policy.k)
        return cls(cohort, generation, version, state, buffer, size, names, table, policy)


@dataclass
class Plan:
    """What one transaction writes: rows to append (all rows when ``rebuild``), the whole new
    neighbour table, the new state. ``generation``/``version`` are filled in by the writer."""

    new_rows: Floats
    new_uids: list[str]
    table: Floats
    state: str
    rebuild: bool
    admitted: int
    trimmed: tuple[Trimmed, ...] = ()
    generation: str = field(default="")
    version: int = field(default=0)

    @property
    def size(self) -> int:
        return int(self.table.shape[0])

    def snapshot(self, before: Snapshot, policy: Policy) -> Snapshot:
        """The snapshot this plan produces from ``before`` (no second trip to Redis)."""
        base = None if self.rebuild or before.size == 0 else before
        return Snapshot.build(
            before.cohort,
            self.generation,
            self.version,
            self.state,
            base,
            self.new_rows,
            self.new_uids,
            self.table,
            policy,
        )


@dataclass(frozen=True)
class Admission:
    snapshot: Snapshot
    admitted: int
    trimmed: tuple[Trimmed, ...]


def plan(snap: Snapshot, vectors: Floats, uids: Sequence[str]) -> Plan | None:
    """The admission of the module docstring; None when nothing joins."""
    policy = snap.policy
    candidates = _fresh(snap, uids)
    room = policy.max_reference - snap.size
    if not candidates or room <= 0:
        return None
    new = unit_rows(vectors)[candidates]
    vs_reference = new @ snap.vectors.T
    if snap.state == SCORED:
        within = scores_from_table(top_k(vs_reference, policy.k)) <= snap.limit
        candidates = [c for c, ok in zip(candidates, within, strict=True) if ok]
        new, vs_reference = new[within], vs_reference[within]
    candidates, new, vs_reference = candidates[:room], new[:room], vs_reference[:room]
    if not candidates:
        return None
    names = [uids[i] for i in candidates]
    table = extend_table(snap.table, vs_reference, new @ new.T, policy.k)
    if not checkpoint(snap.size, table.shape[0], policy):
        return Plan(new, names, table, snap.state, rebuild=False, admitted=len(names))
    return _trim(snap, new, names, table, policy)


def checkpoint(before: int, after: int, policy: Policy) -> bool:
    """Does growing from ``before`` to ``after`` images reach a size where the reference
    re-checks itself: ``min_reference``, each doubling of it, or ``max_reference``?"""
    low = policy.min_reference
    if after < low:
        return False
    if before < low or before < policy.max_reference <= after:
        return True
    return int(math.log2(after / low)) > int(math.log2(before / low))


def _fresh(snap: Snapshot, uids: Sequence[str]) -> list[int]:
    """Indices of images not in the reference yet (and not repeated earlier in the batch)."""
    seen = set(snap.uid_set)
    out = []
    for i, uid in enumerate(uids):
        if uid and uid in seen:
            continue
        seen.add(uid)
        out.append(i)
    return out


def _trim(snap: Snapshot, new: Floats, names: list[str], grown: Floats, policy: Policy) -> Plan:
    everything = np.concatenate([snap.vectors, new])
    all_names = snap.uids + names
    keep, table = trim_bootstrap(everything, policy.k, policy.trim_mads, table=grown)
    kept = everything[keep]
    state = SCORED if kept.shape[0] >= policy.min_reference else BOOTSTRAP
    if keep.all():
        return Plan(new, names, table, state, rebuild=False, admitted=len(names))
    loo = np.sort(scores_from_table(table))
    dropped = np.flatnonzero(~keep)
    scores, _ = knn_scores(everything[dropped], kept, policy.k)
    trimmed = tuple(
        Trimmed(all_names[i], float(s), float(p))
        for i, s, p in zip(dropped, scores, p_values(scores, loo), strict=True)
    )
    kept_names = [name for name, k in zip(all_names, keep, strict=True) if k]
    return Plan(kept, kept_names, table, state, rebuild=True, admitted=len(names), trimmed=trimmed)
