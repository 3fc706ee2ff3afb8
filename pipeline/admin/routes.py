"""The admin HTTP API, every route declared once: :func:`table` is the whole list.

    path                  method  bearer token  answer
    /healthz              GET     no            200 while serving (probes have no token)
    /readyz               GET     yes           200, or 503 while Redis is down, the spool is not
                                                writable or under listener.min_free_disk_mb free,
                                                a dispatcher loop keeps failing, no worker is
                                                alive or the endpoint is unreachable (each check's
                                                result in the body, the failed ones' names under
                                                ``failing``; ``status.ready``)
    /status               GET     yes           the status document (``status.gather``)
    /metrics              GET     yes           Prometheus text: the fleet's endpoint metrics, the
                                                intake counters, every stage's metrics
                                                (``pipeline.stage_metrics``)
    /verdicts             GET     yes           ``?study=UID`` or ``?series=UID``: the verdict
                                                derived from its images
    /search               GET     yes           ``?sop=UID[&top=N][&cohort=C]``: the nearest
                                                stored images
    /studies              GET     yes           ``?state=open|complete&limit=N``: the most recent
                                                studies with their progress (``views.studies``)
    /studies/{study_uid}  GET     yes           one study: its instances' states, verdicts, pushes
    /failures             GET     yes           ``?limit=N&offset=M``: failed instances, newest
                                                first
    /requeue              POST    yes           ``{"dead_letter": id}``, ``{"study": UID}`` or
                                                ``{"instance": UID}``: as `pacs-embed requeue`
    /                     GET     no            the status page (``page``): an HTML shell holding
                                                no data; its script asks for the token and reads
                                                /status, /studies and /failures with it

A handler gets a :class:`Call` (the query string's parameters, the last value of each name; the
path's parameters; the request body) and returns (HTTP status, JSON-able dict or :class:`Text`).
A parameter it cannot use is a 400 naming it and what was expected (:func:`bad_parameter`), never
the text of a Python exception; a handler that raises is a 503 naming only the exception's class.
The handlers read the objects the process's composition root built (``pacs_embed.compose``);
``server.AdminServer`` only serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import metrics
from pipeline.admin import page, status, views
from pipeline.admin.api import (
    AdminState,
    Body,
    Call,
    Handler,
    Query,
    Text,
    bad_parameter,
    integer,
)
from pipeline.detect.search import MAX_TOP, nearest
from pipeline.uids import is_valid_uid

__all__ = ["AdminState", "Body", "Call", "Handler", "Route", "Text", "table"]

GET = ("GET",)
POST = ("POST",)


@dataclass(frozen=True)
class Route:
    """What a path answers, to which methods, and whether the caller must show the bearer
    token (checked before the method: without it every method is 401)."""

    handler: Handler
    token: bool = True
    methods: tuple[str, ...] = GET


def table(state: AdminState) -> dict[str, Route]:
    """Every route the admin endpoint answers; any other path is 404."""
    return {
        "/healthz": Route(healthz, token=False),
        "/readyz": Route(lambda _call: readyz(state)),
        "/status": Route(lambda _call: (200, gather(state))),
        "/metrics": Route(lambda _call: (200, prometheus(state))),
        "/verdicts": Route(lambda call: verdicts(state, call.query)),
        "/search": Route(lambda call: search(state, call.query)),
        "/studies": Route(lambda call: views.studies(state, call.query)),
        "/studies/{study_uid}": Route(
            lambda call: views.study(state, call.path["study_uid"], call.query)
        ),
        "/failures": Route(lambda call: views.failures(state, call.query)),
        "/requeue": Route(lambda call: views.requeue(state, call.body), methods=POST),
        "/": Route(lambda _call: (200, page.shell()), token=False),
    }


def healthz(_call: Call) -> tuple[int, Body]:
    return 200, {"status": "ok"}


def readyz(state: AdminState) -> tuple[int, Body]:
    """Each check's result, and ``failing``: the names of those that failed (503 if any)."""
    checks = status.ready(
        state.connection,
        state.spool_dir,
        min_free_bytes=state.min_free_bytes,
        endpoint=state.endpoint_probe,
    )
    failing = [name for name, ok in checks.items() if not ok]
    return (503 if failing else 200), {**checks, "failing": failing}


def gather(state: AdminState) -> dict[str, Any]:
    """The /status document (also what `pacs-embed status` prints)."""
    return status.gather(
        state.connection,
        state.ledger,
        state.intake,
        state.spool_dir,
        state.quarantine_dir,
        fleet=state.fleet,
    )


def prometheus(state: AdminState) -> Text:
    return Text(metrics.render(*state.collectors), metrics.CONTENT_TYPE)


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
    top = integer(query.get("top", "10"), 1, MAX_TOP)
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
