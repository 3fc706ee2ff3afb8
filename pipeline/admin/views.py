"""The handlers behind /studies, /studies/{study_uid}, /failures and POST /requeue.

Reads are bounded: a list takes a ``limit`` (and /failures an ``offset``), a study's instances
are listed a page at a time. POST /requeue is the one write of the admin endpoint, and does what
`pacs-embed requeue` does (``pipeline.requeue``). Answers carry UIDs, states, reasons and
verdicts, never a value of the data sets, and never echo what the caller sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from itertools import islice
from typing import Any

from pipeline.admin.api import AdminState, Body, Query, bad_parameter, integer, not_found
from pipeline.deadletters import DeadLetters
from pipeline.ledger import State
from pipeline.records import image_key
from pipeline.requeue import (
    NothingToRequeue,
    requeue_dead_letter,
    requeue_instance,
    requeue_study,
)
from pipeline.studies import Studies, StudyProgress, StudyState
from pipeline.uids import is_safe_uid

#: /studies: ``limit``'s default and bound; with ``state``, how many recent studies are looked
#: at to find that many.
STUDIES_LIMIT, MAX_STUDIES, STUDIES_SCANNED = 20, 200, 1000
#: /studies/{study_uid}: instances listed per page, by default and at most.
MEMBERS_LIMIT, MAX_MEMBERS = 500, 5000
#: /failures: ``limit``'s default and bound, and the largest ``offset``.
FAILURES_LIMIT, MAX_FAILURES, MAX_OFFSET = 50, 200, 1_000_000
#: Dead letters looked at for a study's push state (the newest; older ones show in /status).
DEAD_LETTERS_SCANNED = 500
#: A dead letter's id: a push job's id (rq allows [A-Za-z0-9_-]).
_LETTER_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
_REQUEUE_BODY = '{"dead_letter": "<id>"}, {"study": "<UID>"} or {"instance": "<UID>"}'


def _page(query: Query, default: int, most: int) -> tuple[int, int, tuple[int, Body] | None]:
    """``?limit=N&offset=M``: (limit, offset, None), or the 400 naming the one it cannot use."""
    limit = integer(query.get("limit", str(default)), 1, most)
    if limit is None:
        return 0, 0, bad_parameter("limit", f"an integer from 1 to {most}")
    offset = integer(query.get("offset", "0"), 0, MAX_OFFSET)
    if offset is None:
        return 0, 0, bad_parameter("offset", f"an integer from 0 to {MAX_OFFSET}")
    return limit, offset, None


def studies(state: AdminState, query: Query) -> tuple[int, Body]:
    """``?state=open|complete&limit=N``: the most recent studies (by last arrival) with their
    progress; with ``state``, only those in it (among the STUDIES_SCANNED most recent)."""
    limit = integer(query.get("limit", str(STUDIES_LIMIT)), 1, MAX_STUDIES)
    if limit is None:
        return bad_parameter("limit", f"an integer from 1 to {MAX_STUDIES}")
    wanted = query.get("state")
    if wanted is not None and wanted not in set(StudyState):
        return bad_parameter("state", "|".join(StudyState))
    versions = Studies(state.connection)
    found: list[dict[str, Any]] = []
    for uid in versions.recent(limit if wanted is None else STUDIES_SCANNED):
        progress = versions.progress(uid)
        if progress is not None and wanted in (None, progress.state):
            found.append(progress.to_json())
            if len(found) == limit:
                break
    return 200, {"studies": found}


def study(state: AdminState, uid: str, query: Query) -> tuple[int, Body]:
    """One study's progress, its pushes per sink, and a page of its instances (sorted by SOP
    Instance UID; ``?limit=N&offset=M``): each one's state, failure or skip reason, and the
    verdict of each of its images."""
    if not is_safe_uid(uid):
        return bad_parameter("study_uid", "a Study Instance UID")
    limit, offset, bad = _page(query, MEMBERS_LIMIT, MAX_MEMBERS)
    if bad is not None:
        return bad
    versions = Studies(state.connection)
    progress = versions.progress(uid)
    if progress is None:
        return not_found("no study")
    members = versions.members(uid)
    page = members[offset : offset + limit]
    pushes = _pushes(state, progress)
    return 200, {
        **progress.to_json(),
        "pushes": pushes,
        "instances": _instances(state, page, pushes),
        "instances_total": len(members),
        "limit": limit,
        "offset": offset,
    }


def _pushes(state: AdminState, progress: StudyProgress) -> dict[str, dict[str, Any]]:
    """Per sink: the last version delivered there and where the study's latest results stand:
    ``delivered``, ``dead_lettered`` (with the dead letter's id), ``pending`` (complete, push
    on its way) or ``waiting`` (the version is still open)."""
    letters = {
        letter.sink: letter
        for letter in reversed(DeadLetters(state.connection).recent(DEAD_LETTERS_SCANNED))
        if letter.study_instance_uid == progress.study_uid
    }
    complete = progress.completed_version == progress.version
    out: dict[str, dict[str, Any]] = {}
    for sink in sorted({*state.sinks, *progress.pushed}):
        delivered = progress.pushed.get(sink, 0)
        letter = letters.get(sink)
        if complete and delivered >= progress.version:
            where = "delivered"
        elif letter is not None and letter.version >= progress.completed_version:
            where = "dead_lettered"
        else:
            where = "pending" if complete else "waiting"
        out[sink] = {
            "state": where,
            "delivered_version": delivered,
            "dead_letter": letter.id if where == "dead_lettered" and letter else None,
        }
    return out


def _instances(
    state: AdminState, uids: Sequence[str], pushes: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each instance's ledger state (and reason), and its images' verdicts. Results go out per
    study version, so an instance's push state is its study's latest version's, per sink."""
    if not uids:
        return []
    states = state.ledger.states(list(uids))
    frames = [f or (0,) for f in state.ledger.selected_frames(list(uids))]
    images = [image_key(uid, frame) for uid, fs in zip(uids, frames, strict=True) for frame in fs]
    verdicts = iter(state.store.verdicts(images))  # one round trip for the page
    push = {sink: p["state"] for sink, p in pushes.items()}
    out = []
    for n, (uid, (current, held)) in enumerate(zip(uids, states, strict=True)):
        failure = json.loads(held) if current == State.FAILED and held else None
        reason = held if current == State.SKIPPED else None
        out.append(
            {
                "sop_instance_uid": uid,
                "state": str(current) if current else None,
                "reason": failure["reason"] if failure else reason,  # failed or skipped: why
                "stage": failure["stage"] if failure else None,
                "detail": failure.get("detail", "") if failure else None,
                "verdicts": [v.to_json() if v else None for v in islice(verdicts, len(frames[n]))],
                "push": push,
            }
        )
    return out


def failures(state: AdminState, query: Query) -> tuple[int, Body]:
    """``?limit=N&offset=M``: failed instances with stage and reason, newest first, and
    ``total`` (all currently failed)."""
    limit, offset, bad = _page(query, FAILURES_LIMIT, MAX_FAILURES)
    if bad is not None:
        return bad
    rows = state.ledger.failures(limit=limit, offset=offset)
    return 200, {
        "failures": [asdict(row) for row in rows],
        "total": state.ledger.counts()[State.FAILED],
        "limit": limit,
        "offset": offset,
    }


def requeue(state: AdminState, body: bytes) -> tuple[int, Body]:
    """POST ``{"dead_letter": id}``: push it again; ``{"study": UID}``: push the study's latest
    completed version to every sink again; ``{"instance": UID}``: convert and embed a failed
    instance again (the listener picks it up within a second). 404 when there is nothing of
    the kind to requeue; 400 for any other body."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    if not (isinstance(doc, dict) and len(doc) == 1):
        return _bad_body()
    [(kind, name)] = doc.items()
    if not isinstance(name, str):
        return _bad_body()
    connection = state.connection
    try:
        if kind == "dead_letter" and _LETTER_ID.fullmatch(name):
            jobs = [requeue_dead_letter(connection, name)]
        elif kind == "study" and is_safe_uid(name):
            jobs = requeue_study(connection, Studies(connection), state.sinks, name)
        elif kind == "instance" and is_safe_uid(name):
            requeue_instance(connection, state.ledger, name)
            jobs = []
        else:
            return _bad_body()
    except NothingToRequeue:
        return not_found(f"nothing to requeue for that {kind}")
    return 200, {"requeued": kind, "jobs": jobs}


def _bad_body() -> tuple[int, Body]:
    return 400, {"error": "bad request body", "expected": _REQUEUE_BODY}
