"""Reference sets in Redis, one per cohort, shared by every worker on every host.

Keys: see "Reference sets" in pipeline/keys.py (``pe:ref:{CR/CHEST}:meta``, ``:vec``, ``:knn``,
``:uids``, and ``pe:ref:cohorts``). The ``{cohort}`` hash tag keeps a cohort's keys in one Redis
Cluster slot, so one transaction may touch them all.

Concurrency: a writer WATCHes the meta hash, reads the state, computes with numpy and writes the
next state with version + 1 in one MULTI. If another writer committed in between, EXEC fails and
the writer starts again from the newer state; so admissions from many hosts serialise without a
lock, and none is lost or applied twice. ``version`` only grows; it is what a verdict records.

Caching: each process keeps the last snapshot per cohort. A read costs one HMGET while nothing
changed. Within a ``generation`` rows are only appended, so a reader fetches just the new tail
(and the small neighbour table); a trim or an import starts a new generation and is fetched
whole. Not thread-safe: one ReferenceStore per worker thread.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import redis
import structlog

from pipeline.detect import admission
from pipeline.detect.admission import Admission, Plan, Snapshot
from pipeline.detect.scoring import Floats, neighbour_table, unit_rows
from pipeline.keys import REF_COHORTS, reference_keys, text
from pipeline.verdicts import BOOTSTRAP, SCORED

log = structlog.get_logger(__name__)

#: Optimistic-transaction attempts before an admission is given up (logged, never raised:
#: a reference missing a few images is still a valid reference).
MAX_ATTEMPTS = 50


class ReferenceStore:
    """Load, grow, replace and export the reference sets; see the module docstring."""

    def __init__(
        self,
        connection: redis.Redis,
        *,
        k: int,
        min_reference: int,
        max_reference: int,
        trim_mads: float,
        dim: int,
    ) -> None:
        self.redis = connection
        self.policy = admission.Policy(k, min_reference, max_reference, trim_mads)
        self.dim = dim
        self._cache: dict[str, Snapshot] = {}

    # -- reading ------------------------------------------------------------------------------
    def snapshot(self, cohort: str) -> Snapshot:
        """The cohort's current reference (cached; one round trip when unchanged)."""
        cached = self._cache.get(cohort)
        generation, version = self.redis.hmget(
            reference_keys(cohort)["meta"], ["generation", "version"]
        )
        if generation is None:
            self._cache.pop(cohort, None)
            return Snapshot.empty(cohort, self.dim, self.policy)
        if (
            cached is not None
            and cached.generation == text(generation)
            and cached.version == int(cast(bytes, version))
        ):
            return cached
        return self._load(self.redis, cohort, atomic=True)

    def _load(self, conn: Any, cohort: str, *, atomic: bool) -> Snapshot:
        """Fetch what changed since the cached snapshot; everything if the generation moved."""
        cached = self._cache.get(cohort)
        if not atomic and cached is not None:  # under WATCH: a moved version fails the EXEC
            generation, version = conn.hmget(
                reference_keys(cohort)["meta"], ["generation", "version"]
            )
            if text(generation) == cached.generation and text(version) == str(cached.version):
                return cached
        for start in ((cached.size if cached else 0), 0):
            meta, vec, knn, uids = self._read(conn, cohort, start, atomic)
            if not meta:
                self._cache.pop(cohort, None)
                return Snapshot.empty(cohort, self.dim, self.policy)
            info = {text(k): text(v) for k, v in meta.items()}
            same = cached is not None and info["generation"] == cached.generation
            if start and not same:
                continue  # the tail we fetched belongs to another generation: fetch it all
            if int(info["dim"]) != self.dim:
                raise ValueError(
                    f"reference {cohort} holds {info['dim']}-d vectors, embeddings are {self.dim}-d"
                )
            size = int(info["size"])
            rows = np.frombuffer(vec, dtype="<f4").reshape(-1, self.dim)[: size - start]
            stored_k = int(info["k"])
            table = np.frombuffer(knn or b"", dtype="<f4").reshape(-1, stored_k)[:size]
            base = cached if (start and cached is not None) else None
            snap = Snapshot.build(
                cohort,
                info["generation"],
                int(info["version"]),
                info["state"],
                base,
                rows,
                [text(u) for u in uids][: size - start],
                table if stored_k == self.policy.k else None,
                self.policy,
            )
            self._cache[cohort] = snap
            return snap
        raise AssertionError("unreachable: the second pass fetches from row 0")

    def _read(self, conn: Any, cohort: str, start: int, atomic: bool) -> list[Any]:
        key = reference_keys(cohort)
        offset = start * self.dim * 4
        if atomic:
            with conn.pipeline(transaction=True) as pipe:
                pipe.hgetall(key["meta"])
                pipe.getrange(key["vec"], offset, -1)
                pipe.get(key["knn"])
                pipe.lrange(key["uids"], start, -1)
                return list(pipe.execute())
        # Inside a WATCH: sequential reads are safe, EXEC fails if anything moved meanwhile.
        return [
            conn.hgetall(key["meta"]),
            conn.getrange(key["vec"], offset, -1),
            conn.get(key["knn"]),
            conn.lrange(key["uids"], start, -1),
        ]

    def cohorts(self) -> list[str]:
        return sorted(text(c) for c in self.redis.smembers(REF_COHORTS))

    # -- writing ------------------------------------------------------------------------------
    def admit(self, cohort: str, vectors: Floats, uids: Sequence[str]) -> Admission:
        """Offer images to the cohort's reference; the policy decides which join (admission.py).

        A full reference takes nothing: answered from the cache (fresh from the batch's
        assessment) without a transaction, so a frozen cohort costs no Redis round trip here.
        """
        cached = self._cache.get(cohort)
        if cached is not None and cached.size >= self.policy.max_reference:
            return Admission(cached, 0, ())
        return self._transact(cohort, lambda snap: admission.plan(snap, vectors, uids))

    def replace(self, cohort: str, vectors: Floats, uids: Sequence[str] | None = None) -> Snapshot:
        """Make ``vectors`` the cohort's reference (an import); ready if large enough."""
        unit = unit_rows(vectors)
        if unit.shape[1] != self.dim:
            raise ValueError(f"vectors are {unit.shape[1]}-d, embeddings are {self.dim}-d")
        names = list(uids) if uids is not None else [""] * unit.shape[0]
        if len(names) != unit.shape[0]:
            raise ValueError(f"{len(names)} UIDs for {unit.shape[0]} vectors")

        def whole(snap: Snapshot) -> Plan:
            state = SCORED if unit.shape[0] >= self.policy.min_reference else BOOTSTRAP
            table = neighbour_table(unit, self.policy.k)
            return Plan(unit, names, table, state, rebuild=True, admitted=unit.shape[0])

        self._transact(cohort, whole)
        return self._cache[cohort]

    def delete(self, cohort: str) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(*reference_keys(cohort).values())
            pipe.srem(REF_COHORTS, cohort)
            pipe.execute()
        self._cache.pop(cohort, None)

    def _transact(self, cohort: str, make_plan: Any) -> Admission:
        key = reference_keys(cohort)
        for _attempt in range(MAX_ATTEMPTS):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    cast(Any, pipe).watch(key["meta"])
                    snap = self._load(pipe, cohort, atomic=False)
                    plan: Plan | None = make_plan(snap)
                    if plan is None or plan.admitted == 0:
                        pipe.unwatch()
                        return Admission(snap, 0, ())
                    self._write(pipe, snap, plan)
                    pipe.execute()
                except redis.WatchError:
                    continue
            self.redis.sadd(REF_COHORTS, cohort)  # global key, outside the cohort's slot
            after = plan.snapshot(snap, self.policy)
            self._cache[cohort] = after
            return Admission(after, plan.admitted, plan.trimmed)
        log.warning("reference.contended", cohort=cohort, attempts=MAX_ATTEMPTS)
        return Admission(
            self._cache.get(cohort) or Snapshot.empty(cohort, self.dim, self.policy), 0, ()
        )

    def _write(self, pipe: Any, snap: Snapshot, plan: Plan) -> None:
        key = reference_keys(snap.cohort)
        rebuild = plan.rebuild or snap.size == 0
        plan.generation = uuid.uuid4().hex[:12] if rebuild else snap.generation
        plan.version = snap.version + 1
        pipe.multi()
        if rebuild:
            pipe.delete(key["vec"], key["uids"])
        pipe.append(key["vec"], np.ascontiguousarray(plan.new_rows, dtype="<f4").tobytes())
        pipe.set(key["knn"], np.ascontiguousarray(plan.table, dtype="<f4").tobytes())
        if plan.new_uids:
            pipe.rpush(key["uids"], *plan.new_uids)
        pipe.hset(
            key["meta"],
            mapping={
                "generation": plan.generation,
                "version": plan.version,
                "size": plan.size,
                "k": self.policy.k,
                "dim": self.dim,
                "state": plan.state,
                "updated": f"{time.time():.3f}",
            },
        )
