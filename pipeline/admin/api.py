"""What every admin handler shares: the request it is handed (:class:`Call`), the answers it may
give, the state it reads (:class:`AdminState`) and how it reads a parameter (:func:`integer`,
:func:`bad_parameter`). ``routes`` maps paths to handlers; ``app`` turns answers into HTTP."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from prometheus_client.registry import Collector

from pipeline.detect.cohort import CohortRule
from pipeline.intake import IntakeLog
from pipeline.ledger import Ledger
from pipeline.metrics import FleetCollector
from pipeline.store import EmbeddingStore

Query = Mapping[str, str]


@dataclass(frozen=True)
class Call:
    """One request as a handler sees it."""

    query: Query = field(default_factory=dict)  # the last value of each name
    path: Mapping[str, str] = field(default_factory=dict)  # e.g. {"study_uid": ...}
    body: bytes = b""  # at most Limits.max_body_bytes


@dataclass(frozen=True)
class Text:
    """An answer that is not JSON: the Prometheus exposition of /metrics, the status page."""

    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)


Body = dict[str, Any] | Text
Handler = Callable[[Call], tuple[int, Body]]


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
    #: The configured sinks' names: where POST /requeue {"study"} pushes again, and the sinks
    #: whose push state /studies/{study_uid} shows.
    sinks: Sequence[str] = ()
    #: /readyz: the spool's disk must have this much free (``listener.min_free_disk_mb``).
    min_free_bytes: int = 0
    #: /readyz: whether the endpoint is reachable (``probe.EndpointProbe``, cached); None: no
    #: endpoint configured in this process, no such check.
    endpoint_probe: Callable[[], bool] | None = None

    @property
    def fleet(self) -> FleetCollector | None:
        """The fleet's endpoint metrics among ``collectors`` (with the in-flight leases when
        the endpoint has a limit), for /status ``endpoint``."""
        return next((c for c in self.collectors if isinstance(c, FleetCollector)), None)


def bad_parameter(name: str, expected: str) -> tuple[int, Body]:
    """400 naming the query parameter and what it should hold (not what it held: no echo)."""
    return 400, {"error": "bad parameter", "parameter": name, "expected": expected}


def not_found(what: str) -> tuple[int, Body]:
    """404 naming the kind of thing that is not there (``"no study"``), not the value asked."""
    return 404, {"error": what}


def integer(text: str, low: int, high: int) -> int | None:
    """``text`` as an integer in [low, high], else None. ASCII digits only (``int`` also takes
    "+5", " 5", "5_0" and other scripts' digits), and few of them (``int`` refuses past 4300)."""
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(high))):
        return None
    value = int(text)
    return value if low <= value <= high else None
