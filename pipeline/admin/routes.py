"""The admin HTTP API, every route declared once: :func:`table` is the whole list.

    path       bearer token  answer
    /healthz   no            200 while serving (load balancers and probes have no token)
    /readyz    yes           200, or 503 while Redis is down, the spool is not writable or a
                             dispatcher loop keeps failing (each check's result in the body)
    /status    yes           the status document (``status.gather``)
    /metrics   yes           Prometheus text: the fleet's endpoint metrics, the intake counters
    /verdicts  yes           ``?study=UID`` or ``?series=UID``: the verdict derived from its images
    /search    yes           ``?sop=UID[&top=N][&cohort=C]``: the nearest stored images

A handler gets the query string's parameters (the last value of each name; most ignore them) and
returns (HTTP status, JSON-able dict or :class:`Text`). The handlers read the objects the
process's composition root built (``pacs_embed.compose``); ``server.AdminServer`` only serves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from prometheus_client.registry import Collector

from pipeline import metrics
from pipeline.admin import status
from pipeline.detect.cohort import CohortRule
from pipeline.detect.search import nearest
from pipeline.intake import IntakeLog
from pipeline.ledger import Ledger
from pipeline.store import EmbeddingStore
from pipeline.uids import is_valid_uid


@dataclass(frozen=True)
class Text:
    """An answer that is not JSON, e.g. the Prometheus exposition of /metrics."""

    body: bytes
    content_type: str


Query = Mapping[str, str]
Body = dict[str, Any] | Text
Handler = Callable[[Query], tuple[int, Body]]


@dataclass(frozen=True)
class Route:
    """What a path answers, and whether the caller must show the bearer token."""

    handler: Handler
    token: bool = True


@dataclass(frozen=True)
class AdminState:
    """What the routes read, built once by the process's composition root."""

    connection: redis.Redis
    ledger: Ledger
    intake: IntakeLog
    store: EmbeddingStore
    cohort_rule: CohortRule
    spool_dir: Path
    quarantine_dir: Path
    collectors: Sequence[Collector]  # rendered in this order by /metrics


def table(state: AdminState) -> dict[str, Route]:
    """Every route the admin endpoint answers; any other path is 404."""
    return {
        "/healthz": Route(healthz, token=False),
        "/readyz": Route(lambda _query: readyz(state)),
        "/status": Route(lambda _query: (200, gather(state))),
        "/metrics": Route(lambda _query: (200, prometheus(state))),
        "/verdicts": Route(lambda query: verdicts(state, query)),
        "/search": Route(lambda query: search(state, query)),
    }


def healthz(_query: Query) -> tuple[int, Body]:
    return 200, {"status": "ok"}


def readyz(state: AdminState) -> tuple[int, Body]:
    checks = status.ready(state.connection, state.spool_dir)
    return (200 if all(checks.values()) else 503), dict(checks)


def gather(state: AdminState) -> dict[str, Any]:
    """The /status document (also what `pacs-embed status` prints)."""
    return status.gather(
        state.connection, state.ledger, state.intake, state.spool_dir, state.quarantine_dir
    )


def prometheus(state: AdminState) -> Text:
    return Text(metrics.render(*state.collectors), metrics.CONTENT_TYPE)


def verdicts(state: AdminState, query: Query) -> tuple[int, Body]:
    """``study=UID`` or ``series=UID``: that group's verdict, 404 when nothing is stored."""
    for kind, read in (
        ("study", state.store.study_verdict),
        ("series", state.store.series_verdict),
    ):
        uid = query.get(kind, "")
        if is_valid_uid(uid):
            found = read(uid)
            return (200, found.to_json()) if found else (404, {"error": f"no {kind}"})
    return 400, {"error": "give study=<UID> or series=<UID>"}


def search(state: AdminState, query: Query) -> tuple[int, Body]:
    """``sop=UID[&top=N][&cohort=C]``: the stored images nearest to that stored image."""
    sop = query.get("sop", "")
    if not is_valid_uid(sop):
        return 400, {"error": "give sop=<SOP Instance UID>"}
    vector = state.store.get(sop)
    if vector is None:
        return 404, {"error": "no stored embedding for that SOP Instance UID"}
    try:
        top = int(query.get("top", "10"))
        cohort = state.cohort_rule.parse(query["cohort"]) if query.get("cohort") else None
        hits = nearest(state.store, vector, top=top, cohort=cohort, exclude=sop)
    except ValueError as exc:
        return 400, {"error": str(exc)}
    return 200, {"query": sop, "hits": [h.to_json() for h in hits]}
