"""The admin HTTP API, every route declared once: :func:`table` is the whole list.

    path       bearer token  answer
    /healthz   no            200 while serving (load balancers and probes have no token)
    /readyz    yes           200, or 503 while Redis is down, the spool is not writable or a
                             dispatcher loop keeps failing (each check's result in the body,
                             the failed ones' names under ``failing``)
    /status    yes           the status document (``status.gather``)
    /metrics   yes           Prometheus text: the fleet's endpoint metrics, the intake counters
    /verdicts  yes           ``?study=UID`` or ``?series=UID``: the verdict derived from its images
    /search    yes           ``?sop=UID[&top=N][&cohort=C]``: the nearest stored images

A handler gets the query string's parameters (the last value of each name; most ignore them) and
returns (HTTP status, JSON-able dict or :class:`Text`). A parameter it cannot use is a 400 naming
it and what was expected (:func:`bad_parameter`), never the text of a Python exception; a handler
that raises is a 503 naming only the exception's class. The handlers read the objects the
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
from pipeline.detect.search import MAX_TOP, nearest
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
    """Each check's result, and ``failing``: the names of those that failed (503 if any)."""
    checks = status.ready(state.connection, state.spool_dir)
    failing = [name for name, ok in checks.items() if not ok]
    return (503 if failing else 200), {**checks, "failing": failing}


def gather(state: AdminState) -> dict[str, Any]:
    """The /status document (also what `pacs-embed status` prints)."""
    return status.gather(
        state.connection, state.ledger, state.intake, state.spool_dir, state.quarantine_dir
    )


def prometheus(state: AdminState) -> Text:
    return Text(metrics.render(*state.collectors), metrics.CONTENT_TYPE)


def bad_parameter(name: str, expected: str) -> tuple[int, Body]:
    """400 naming the query parameter and what it should hold (not what it held: no echo)."""
    return 400, {"error": "bad parameter", "parameter": name, "expected": expected}


def verdicts(state: AdminState, query: Query) -> tuple[int, Body]:
    """``study=UID`` or ``series=UID``: that group's verdict, 404 when nothing is stored."""
    for kind, read in (
        ("study", state.store.study_verdict),
        ("series", state.store.series_verdict),
    ):
        if kind in query:
            uid = query[kind]
            if not is_valid_uid(uid):
                return bad_parameter(kind, "a DICOM UID")
            found = read(uid)
            return (200, found.to_json()) if found else (404, {"error": f"no {kind}"})
    return bad_parameter("study", "study=<UID> or series=<UID>")


def search(state: AdminState, query: Query) -> tuple[int, Body]:
    """``sop=UID[&top=N][&cohort=C]``: the stored images nearest to that stored image."""
    sop = query.get("sop", "")
    if not is_valid_uid(sop):
        return bad_parameter("sop", "a SOP Instance UID")
    top = _integer(query.get("top", "10"), 1, MAX_TOP)
    if top is None:
        return bad_parameter("top", f"an integer from 1 to {MAX_TOP}")
    cohort = None
    if query.get("cohort"):
        try:
            cohort = state.cohort_rule.parse(query["cohort"])
        except ValueError:
            return bad_parameter("cohort", "/".join(state.cohort_rule.fields))
    vector = state.store.get(sop)
    if vector is None:
        return 404, {"error": "no stored embedding for that SOP Instance UID"}
    hits = nearest(state.store, vector, top=top, cohort=cohort, exclude=sop)
    return 200, {"query": sop, "hits": [h.to_json() for h in hits]}


def _integer(text: str, low: int, high: int) -> int | None:
    """``text`` as an integer in [low, high], else None. ASCII digits only (``int`` also takes
    "+5", " 5", "5_0" and other scripts' digits), and few of them (``int`` refuses past 4300)."""
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(high))):
        return None
    value = int(text)
    return value if low <= value <= high else None
