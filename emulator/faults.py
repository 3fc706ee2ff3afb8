"""How the emulator misbehaves on purpose, and what it counted. NOT A MEDICAL MODEL.

A run's ``FaultPlan`` is its ``[emulator]`` settings section (declared, with its rules, in
``pipeline.sections``): added latency, a capacity past which requests get 429 as Azure ML answers
them, random error rates, hanging requests, truncated bodies and a cold start. Tests can also
force one fault on one request with the ``x-emulator-fault`` header (see ``emulator.server``).
``Stats`` counts what was answered, including the most requests ever in flight, so a test or the
bench can check from the server's side that a client fleet kept to its concurrency limit.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from typing import Any

from pipeline.sections import FaultPlan

__all__ = [
    "FAULTS",
    "MODEL_ERROR_HEADERS",
    "RETRY_AFTER_STATUSES",
    "TRUNCATED_BODY",
    "FaultPlan",
    "Stats",
    "draw",
]

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
