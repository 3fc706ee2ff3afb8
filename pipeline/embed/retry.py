"""Which endpoint answers are worth retrying, and how long to wait before the next try.

Pure functions, so the policy is tested without a clock: the client hands in its ``random.Random``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

#: Statuses that mean "not now": request timeout, throttling, server errors, cold start/scaling.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

#: Status that means "this request is too large": the client splits the batch in half.
TOO_LARGE_STATUS = 413

#: Prefix of the headers Azure ML uses to explain a model error (424),
#: e.g. ``ms-azureml-model-error-reason``.
MODEL_ERROR_HEADER_PREFIX = "ms-azureml-model-error-"

#: How much of the server's error body goes into a permanent error's message.
MAX_ERROR_BODY_CHARS = 500


@dataclass(frozen=True)
class AttemptFailure:
    """One attempt's transient failure: the message, the reason it is counted under in metrics
    (a status such as ``"429"``, or ``"timeout"``, ``"connection"``, ``"malformed"``), and the
    status and ``Retry-After`` hint when the server answered."""

    message: str
    reason: str
    status: int | None = None
    retry_after: float | None = None


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential back-off: ``uniform(0, min(cap, base * 2**attempt))``.

    ``attempt`` counts from 0 for the wait after the first failure. Full jitter spreads the
    retries of many workers that were throttled together instead of re-synchronising them.
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 62))
    return rng.uniform(0.0, ceiling)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The ``Retry-After`` hint in seconds, or ``None`` if absent or not in the seconds form.

    The HTTP-date form is ignored on purpose: it depends on the two clocks agreeing, and Azure ML
    sends seconds.
    """
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def next_delay(
    attempt: int, retry_after: float | None, *, base: float, cap: float, rng: random.Random
) -> float:
    """The wait before the next try: the larger of the jittered back-off and the server's hint."""
    delay = backoff_delay(attempt, base=base, cap=cap, rng=rng)
    return max(delay, retry_after) if retry_after is not None else delay


def model_error_details(headers: Mapping[str, str]) -> list[str]:
    """``name=value`` for every ``ms-azureml-model-error-*`` header, sorted for stable messages."""
    return sorted(
        f"{name}={value}"
        for name, value in headers.items()
        if name.lower().startswith(MODEL_ERROR_HEADER_PREFIX)
    )


def permanent_message(status: int, phrase: str, headers: Mapping[str, str], body: str) -> str:
    """The quarantine reason for a permanent answer: status, model-error headers, server text."""
    parts = [f"endpoint answered {status} {phrase}".rstrip()]
    details = model_error_details(headers)
    if details:
        parts.append("; ".join(details))
    text = body.strip()
    if text:
        if len(text) > MAX_ERROR_BODY_CHARS:
            text = text[:MAX_ERROR_BODY_CHARS] + "..."
        parts.append(text)
    return ": ".join(parts)
