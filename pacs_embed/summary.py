"""`pacs-embed status` for a person: the /status document (``pipeline.admin.status.gather``)
as a compact text summary. ``status --json`` prints the document itself.

Only what the document holds (counts, UIDs, reasons), so no more than /status shows; a section
the document lacks is left out, so an older or newer daemon's document still renders.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

#: How many recent studies and failures the summary lists (the document holds more).
STUDIES = 5
FAILURES = 5


def render(
    doc: Mapping[str, Any],
    *,
    studies: int = STUDIES,
    failures: int = FAILURES,
    now: float | None = None,
) -> str:
    """The summary, one line per fact, indented lists under their heading."""
    lines: list[str] = []
    now = time.time() if now is None else now
    uptime = doc.get("uptime_seconds")
    lines.append(
        f"pacs-embed {doc.get('version', '?')}, "
        + (f"up {duration(uptime)}" if isinstance(uptime, int | float) else "no component up")
    )
    lines += _instances(doc)
    lines += _endpoint(doc.get("endpoint"))
    lines += _queues(doc.get("queues"))
    lines += _workers(doc.get("workers"), doc.get("pushers"))
    lines += _listeners(doc.get("dispatchers"), doc.get("associations"))
    lines += _sinks(doc.get("sinks"))
    lines += _spool(doc.get("spool"))
    lines += _studies(doc.get("studies"), studies, now)
    lines += _failures(doc.get("failures"), failures)
    return "\n".join(lines) + "\n"


def duration(seconds: float) -> str:
    """3725 -> '1h 02m'; 75 -> '1m 15s'; 2 days and more in days and hours."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400 * 2:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def size(count: float) -> str:
    """Bytes as B, KiB, MiB, GiB or TiB, one decimal."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _pairs(counts: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    shown = [f"{name} {value}" for name, value in counts.items() if name not in skip]
    return ", ".join(shown) if shown else "none"


def _instances(doc: Mapping[str, Any]) -> list[str]:
    lines = []
    instances = doc.get("instances")
    if isinstance(instances, Mapping):
        received = instances.get("received", 0)
        lines.append(f"instances   {received} received: {_pairs(instances, skip=('received',))}")
    counters = doc.get("counters")
    if isinstance(counters, Mapping):
        lines.append(f"counters    {_pairs(counters)}")
    intake = doc.get("input")
    if isinstance(intake, Mapping):
        turned_away = []
        for kind in ("refused", "associations_rejected", "contexts_rejected"):
            reasons = intake.get(kind)
            if isinstance(reasons, Mapping) and reasons:
                turned_away.append(f"{kind.replace('_', ' ')} {sum(reasons.values())}")
        if intake.get("nonconformant_uids"):
            turned_away.append(f"non-conformant UIDs {intake['nonconformant_uids']}")
        lines.append(f"input       {', '.join(turned_away) if turned_away else 'nothing refused'}")
    return lines


def _endpoint(endpoint: Any) -> list[str]:
    if not isinstance(endpoint, Mapping):
        return []
    parts = [
        f"{endpoint.get('requests', 0)} requests",
        f"{endpoint.get('errors', 0)} errors ({100 * float(endpoint.get('error_rate', 0)):.1f}%)",
        f"{endpoint.get('retries', 0)} retries",
    ]
    latency = endpoint.get("latency_seconds")
    if isinstance(latency, Mapping) and latency.get("mean") is not None:
        parts.append(f"latency mean {latency['mean']:.2f} s, p95 {_bound(latency.get('p95'))}")
    if endpoint.get("in_flight") is not None:
        parts.append(f"in flight {endpoint['in_flight']}/{endpoint.get('in_flight_limit')}")
    if endpoint.get("images_per_second") is not None:
        parts.append(f"{endpoint['images_per_second']} images/s")
    return [f"endpoint    {', '.join(parts)}"]


def _bound(value: Any) -> str:
    return f"<= {value} s" if value is not None else "above the last bucket"


def _queues(queues: Any) -> list[str]:
    if not isinstance(queues, Mapping):
        return []
    return [
        f"queue       {name}: {_pairs(depths)}"
        for name, depths in queues.items()
        if isinstance(depths, Mapping)
    ]


def _workers(workers: Any, pushers: Any) -> list[str]:
    lines = []
    if isinstance(workers, Sequence):
        lines.append(f"workers     {len(workers)} alive")
        for worker in workers:
            if not isinstance(worker, Mapping):
                continue
            lines.append(f"  {worker.get('name', '?')}  {worker.get('state', '?')}{_jobs(worker)}")
    if isinstance(pushers, Mapping):
        lines.append(f"pushers     {len(pushers)} alive")
        for name, report in sorted(pushers.items()):
            state = report.get("state", "?") if isinstance(report, Mapping) else "?"
            lines.append(f"  {name}  {state}{_jobs(report)}")
    return lines


def _jobs(report: Any) -> str:
    jobs = report.get("jobs") if isinstance(report, Mapping) else None
    return f"  job {', '.join(map(str, jobs))}" if isinstance(jobs, list) and jobs else ""


def _listeners(dispatchers: Any, associations: Any) -> list[str]:
    lines = []
    if isinstance(dispatchers, Mapping):
        if not dispatchers:
            lines.append("dispatchers none reporting")
        for name, report in sorted(dispatchers.items()):
            if not isinstance(report, Mapping):
                continue
            if report.get("ok"):
                health = "ok"
            else:
                error = report.get("last_error") or "error"
                health = f"FAILING for {report.get('failing_for_seconds', '?')} s ({error})"
            lines.append(f"dispatcher  {name}: {health}, backlog {report.get('backlog', '?')}")
    if isinstance(associations, Sequence) and associations:
        lines.append(f"associations {len(associations)} open")
    return lines


def _sinks(sinks: Any) -> list[str]:
    if not isinstance(sinks, Mapping):
        return []
    lines = [
        f"sinks       pending {sinks.get('pending', 0)}, "
        f"dead-lettered {sinks.get('dead_lettered', 0)}"
    ]
    pushes = sinks.get("pushes")
    if isinstance(pushes, Mapping):
        for sink, outcomes in sorted(pushes.items()):
            if isinstance(outcomes, Mapping):
                lines.append(f"  {sink}: {_pairs(outcomes)}")
    return lines


def _spool(spool: Any) -> list[str]:
    if not isinstance(spool, Mapping):
        return []
    free = spool.get("free_bytes")
    shown = size(free) if isinstance(free, int | float) else "unknown (no spool dir)"
    return [f"spool       free {shown}, {spool.get('quarantined', 0)} quarantined"]


def _studies(section: Any, limit: int, now: float) -> list[str]:
    recent = section.get("recent") if isinstance(section, Mapping) else None
    if not isinstance(recent, Sequence):
        return []
    if not recent:
        return ["studies     none yet"]
    lines = [f"studies     {min(limit, len(recent))} most recent"]
    for study in recent[:limit]:
        if not isinstance(study, Mapping):
            continue
        pushed = study.get("pushed") or {}
        where = ", ".join(f"{sink} v{v}" for sink, v in sorted(pushed.items())) or "nowhere"
        state = "complete" if study.get("complete") else str(study.get("state", "?"))
        last = study.get("last_arrival")
        ago = f", last arrival {duration(max(0.0, now - last))} ago" if last else ""
        lines.append(
            f"  {study.get('study_instance_uid', '?')}  v{study.get('version', '?')}  {state}"
            f"  {study.get('final', 0)}/{study.get('received', 0)} final"
            f"  pushed {where}{ago}"
        )
    return lines


def _failures(failures: Any, limit: int) -> list[str]:
    if not isinstance(failures, Sequence):
        return []
    if not failures:
        return ["failures    none"]
    lines = [f"failures    {min(limit, len(failures))} most recent of {len(failures)} listed"]
    for failure in failures[:limit]:
        if not isinstance(failure, Mapping):
            continue
        lines.append(
            f"  {failure.get('at', '?')}  {failure.get('sop_instance_uid', '?')}"
            f"  {failure.get('stage', '?')}: {failure.get('reason', '?')}"
        )
    return lines
