"""How the emulator misbehaves on purpose, and what it counted. NOT A MEDICAL MODEL.

A ``FaultPlan`` is set per run (``pacs-embed emulator`` reads it from ``[emulator]`` settings):
added latency, a capacity past which requests get 429 as Azure ML answers them, random error
rates, hanging requests, truncated bodies and a cold start. Tests can also force one fault on one
request with the ``x-emulator-fault`` header (see ``emulator.server``). ``Stats`` counts what was
answered, including the most requests ever in flight, so a test or the bench can check from the
server's side that a client fleet kept to its concurrency limit.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

#: Faults by name: the status answered and its message. ``hang`` never answers; ``malformed``
#: answers 200 with a truncated body.
FAULTS: dict[str, tuple[int, str]] = {
    "408": (408, "injected fault: request timed out"),
    "413": (413, "injected fault: request entity too large"),
    "424": (424, "injected fault: model error"),
    "429": (429, "injected fault: too many requests"),
    "500": (500, "injected fault: internal server error"),
    "503": (503, "injected fault: service unavailable"),
    "hang": (0, "injected fault: no answer"),
    "malformed": (200, "injected fault: truncated body"),
}

#: Headers Azure ML adds to a 424 to say why the model failed.
MODEL_ERROR_HEADERS = {
    "ms-azureml-model-error-reason": "model_error",
    "ms-azureml-model-error-statuscode": "500",
}

#: Statuses that carry ``Retry-After`` when one is configured (as Azure ML's throttling does).
RETRY_AFTER_STATUSES = frozenset({429, 503})

#: The body of a ``malformed`` answer: valid JSON cut short.
TRUNCATED_BODY = b'[{"image_features": [[0.125, -0.25'


@dataclass(frozen=True)
class FaultPlan:
    """Faults for a whole run. Rates are per request, drawn independently of the content."""

    latency_ms: float = 0.0  # an answer takes at least this long, its own work included
    latency_per_image_ms: float = 0.0  # ... plus this per image row
    capacity: int = 0  # requests in flight at most; past it, 429 at once (0: unlimited)
    rate_429: float = 0.0
    rate_503: float = 0.0
    rate_500: float = 0.0
    rate_408: float = 0.0
    rate_hang: float = 0.0  # no answer until the client gives up (or hang_seconds)
    rate_malformed: float = 0.0  # 200 with a truncated body
    retry_after_seconds: float | None = None  # Retry-After on 429/503 (None: no header)
    cold_start_seconds: float = 0.0  # every request gets 503 this long after start
    hang_seconds: float = 300.0  # a hung request is dropped after this long
    seed: int | None = None  # fault draws repeat for a seed

    def __post_init__(self) -> None:
        for name in ("latency_ms", "latency_per_image_ms", "cold_start_seconds", "capacity"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hang_seconds <= 0:
            raise ValueError(f"hang_seconds must be positive, got {self.hang_seconds}")
        if self.retry_after_seconds is not None and self.retry_after_seconds < 0:
            raise ValueError(f"retry_after_seconds must be >= 0, got {self.retry_after_seconds}")
        rates = self.rates()
        for name, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"rate_{name} must be within [0, 1], got {rate}")
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"fault rates add up to more than 1: {rates}")

    def rates(self) -> dict[str, float]:
        """Fault name -> probability per request."""
        return {
            "429": self.rate_429,
            "503": self.rate_503,
            "500": self.rate_500,
            "408": self.rate_408,
            "hang": self.rate_hang,
            "malformed": self.rate_malformed,
        }


def draw(plan: FaultPlan, rng: random.Random) -> str | None:
    """One request's random fault (a ``FAULTS`` name), or None for a normal answer."""
    roll = rng.random()
    for name, rate in plan.rates().items():
        if roll < rate:
            return name
        roll -= rate
    return None


class Stats:
    """Thread-safe counts of what the emulator did, for tests, the bench and ``GET /stats``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.statuses: Counter[str] = Counter()
        self.over_capacity = 0  # 429s answered because capacity was reached
        self.injected: Counter[str] = Counter()  # faults injected, by name
        self.images_embedded = 0  # image rows in complete 200 answers

    def enter(self, capacity: int) -> bool:
        """Count a request in flight; False (and not counted) when capacity is reached."""
        with self._lock:
            if capacity and self.in_flight >= capacity:
                self.over_capacity += 1
                return False
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return True

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def answered(self, status: int | str, images: int = 0) -> None:
        with self._lock:
            self.statuses[str(status)] += 1
            self.images_embedded += images

    def fault(self, name: str) -> None:
        with self._lock:
            self.injected[name] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "statuses": dict(self.statuses),
                "over_capacity": self.over_capacity,
                "injected": dict(self.injected),
                "images_embedded": self.images_embedded,
            }
