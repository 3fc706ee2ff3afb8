"""The HTTP client of the MedImageInsight online endpoint (docs/architecture.md §7).

One ``embed(rows)`` call is one logical request: it retries transient failures (408, 429, 5xx,
dropped connections, timeouts, a 2xx body cut short) with full-jitter exponential back-off that
honours ``Retry-After``, splits the batch in half on 413, and maps everything else to the
``EndpointError`` tree:

    TransientEndpointError   still failing after max_attempts or past the deadline: retry the job
      EndpointAuthError      401/403 at once, unretried here: the key or token is wrong, not the
                             images, so the job is retried later (nothing is quarantined)
    PermanentEndpointError   400/404/424/...: the server's message is the quarantine reason
    ResponseFormatError      a 2xx JSON answer that does not fit the contract (see contract.py)

Each HTTP attempt (not each call) holds a slot of the optional fleet-wide ``limiter`` while it is
on the wire, so back-off sleeps and response parsing never keep other workers waiting. Every
attempt and retry is reported to the optional ``metrics``.

The key is sent only in the ``Authorization`` header; it never appears in a log line or a message.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import NoReturn

import httpx
import numpy as np
import structlog

from pipeline.embed.auth import AZURE_ML_SCOPE, TokenCache, TokenCredential
from pipeline.embed.contract import EMBEDDING_DIM, EmbedResult, Matrix, Row, build_request
from pipeline.embed.contract import parse_response as parse_contract_response
from pipeline.embed.limiter import InFlightLimiter, Lease
from pipeline.embed.retry import (
    TOO_LARGE_STATUS,
    TRANSIENT_STATUSES,
    AttemptFailure,
    next_delay,
    permanent_message,
    retry_after_seconds,
)
from pipeline.errors import (
    ConfigError,
    EndpointAuthError,
    PermanentEndpointError,
    ResponseFormatError,
    TransientEndpointError,
)
from pipeline.metrics import NO_METRICS, RequestMetrics
from pipeline.sections import EndpointSettings

__all__ = ["AZURE_ML_SCOPE", "EndpointClient", "RequestMetrics", "TokenCredential"]

log = structlog.get_logger(__name__)

#: Credentials refused: the operator must act, the images are not at fault.
AUTH_STATUSES = frozenset({401, 403})

#: Header that routes a request to one deployment behind the endpoint.
DEPLOYMENT_HEADER = "azureml-model-deployment"


class _TooLarge(Exception):
    """The endpoint answered 413 for this batch; the caller splits it."""


class EndpointClient:
    """Synchronous, thread-safe client of one scoring URI. Close it (or use ``with``)."""

    def __init__(
        self,
        endpoint: EndpointSettings | str,
        *,
        key: str | None = None,
        credential: TokenCredential | None = None,
        transport: httpx.BaseTransport | None = None,
        limiter: InFlightLimiter | None = None,
        metrics: RequestMetrics | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``endpoint``: the [endpoint] section (URL, deployment, timeouts, retries, deadline),
        or a scoring URI alone with the default settings. ``key`` (the section's secret, read
        from the environment or its file) or ``credential`` authenticates; ``transport``,
        ``sleep``, ``rng`` and ``clock`` are for tests."""
        if isinstance(endpoint, str):
            endpoint = EndpointSettings(url=endpoint)
        if not endpoint.url:
            raise ConfigError("endpoint.url is not set (PACS_EMBED_ENDPOINT__URL)")
        if key is not None and credential is not None:
            raise ValueError("give either key or credential, not both")
        self._endpoint = endpoint
        self._url: str = endpoint.url  # checked set above
        self._key = key or None
        self._tokens = TokenCache(credential) if credential is not None else None
        self._limiter = limiter
        self._metrics: RequestMetrics = metrics or NO_METRICS
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._clock = clock
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(endpoint.read_timeout, connect=endpoint.connect_timeout),
            headers={"user-agent": "pacs-embed", "content-type": "application/json"},
        )

    def __enter__(self) -> EndpointClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def embed(self, rows: Sequence[Row]) -> EmbedResult:
        """Embeddings for ``rows`` (row-aligned), retried and split before the deadline."""
        rows = list(rows)
        if not rows:
            empty = np.empty((0, EMBEDDING_DIM), dtype=np.float32)
            return EmbedResult(image=empty, text=empty.copy(), scaling_factor=None)
        return self._embed(rows, self._clock() + self._endpoint.deadline)

    def embed_images(self, pngs: Sequence[bytes]) -> Matrix:
        """``(len(pngs), EMBEDDING_DIM)`` float32 L2-normalised image embeddings."""
        return self.embed([Row(image_png=png) for png in pngs]).image

    def _embed(self, rows: list[Row], deadline_at: float) -> EmbedResult:
        try:
            return self._post_with_retries(rows, deadline_at)
        except _TooLarge:
            if len(rows) == 1:
                raise PermanentEndpointError(
                    "endpoint answered 413: a single row is too large to send", status=413
                ) from None
            half = len(rows) // 2
            log.info("endpoint.split", rows=len(rows), halves=(half, len(rows) - half))
            first = self._embed(rows[:half], deadline_at)
            second = self._embed(rows[half:], deadline_at)
            return _concat(first, second)

    def _post_with_retries(self, rows: list[Row], deadline_at: float) -> EmbedResult:
        content = json.dumps(build_request(rows), separators=(",", ":")).encode()
        failure = AttemptFailure("no attempt made", "none")
        attempts = 0
        while attempts < self._endpoint.max_attempts:
            if deadline_at - self._clock() <= 0:
                break
            attempts += 1
            outcome = self._attempt(content, rows, deadline_at)
            if isinstance(outcome, EmbedResult):
                return outcome
            failure = outcome
            if attempts >= self._endpoint.max_attempts:
                break
            delay = next_delay(
                attempts - 1,
                failure.retry_after,
                base=self._endpoint.backoff_base,
                cap=self._endpoint.backoff_max,
                rng=self._rng,
            )
            if self._clock() + delay >= deadline_at:
                message = f"{failure.message}; next wait of {delay:.1f} s would pass the deadline"
                failure = AttemptFailure(
                    message, failure.reason, failure.status, failure.retry_after
                )
                break
            log.warning(
                "endpoint.retry",
                status=failure.status,
                error=failure.message,
                attempt=attempts,
                delay=round(delay, 3),
                retry_after=failure.retry_after,
            )
            self._metrics.retry(failure.reason)
            self._sleep(delay)
        raise TransientEndpointError(
            self._redact(
                f"endpoint failed {attempts} time(s) (max_attempts {self._endpoint.max_attempts}, "
                f"deadline {self._endpoint.deadline:g} s): {failure.message}"
            ),
            status=failure.status,
            retry_after=failure.retry_after,
        )

    def _attempt(
        self, content: bytes, rows: list[Row], deadline_at: float
    ) -> EmbedResult | AttemptFailure:
        """One POST inside one in-flight slot: the result, or the transient failure to retry."""
        headers = self._headers()  # may fetch a token: before taking a slot, not inside it
        lease = self._take_slot(deadline_at)
        started = time.perf_counter()
        try:
            remaining = max(deadline_at - self._clock(), 0.001)
            response = self._http.post(
                self._url,
                content=content,
                headers=headers,
                timeout=httpx.Timeout(
                    min(self._endpoint.read_timeout, remaining),
                    connect=min(self._endpoint.connect_timeout, remaining),
                ),
            )
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise PermanentEndpointError(f"endpoint URL unusable: {exc}") from exc
        except httpx.TransportError as exc:
            kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection"
            self._report(kind, time.perf_counter() - started, content)
            return AttemptFailure(type(exc).__name__, kind)
        finally:
            if lease is not None:
                lease.release()
        elapsed = time.perf_counter() - started
        status = response.status_code
        if not response.is_success:
            self._report(str(status), elapsed, content)
            if status == TOO_LARGE_STATUS:
                raise _TooLarge
            if status not in TRANSIENT_STATUSES:
                self._raise_unretried(response)
            retry_after = retry_after_seconds(response.headers)
            return AttemptFailure(f"HTTP {status}", str(status), status, retry_after)
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError) as exc:
            # A 2xx cut short, or a proxy's page, says nothing about the images: try again.
            self._report(str(status), elapsed, content)
            snippet = response.text[:80]
            return AttemptFailure(
                f"HTTP {status} body is not JSON ({exc}): {snippet!r}", "malformed"
            )
        try:
            result = parse_contract_response(body, rows)
        except ResponseFormatError:
            self._report(str(status), elapsed, content)
            raise
        images = sum(row.has_image for row in rows)
        self._report(str(status), elapsed, content, images)
        return result

    def _take_slot(self, deadline_at: float) -> Lease | None:
        if self._limiter is None:
            return None
        waited_from = time.perf_counter()
        lease = self._limiter.acquire(max(0.0, deadline_at - self._clock()))
        self._metrics.slot_wait(time.perf_counter() - waited_from)
        if lease is None:
            raise TransientEndpointError(
                f"no in-flight slot came free (fleet-wide limit {self._limiter.limit}) "
                f"before the deadline ({self._endpoint.deadline:g} s)"
            )
        return lease

    def _report(self, status: str, seconds: float, content: bytes, images: int = 0) -> None:
        self._metrics.attempt(
            status=status, seconds=seconds, bytes_sent=len(content), images=images
        )

    def _raise_unretried(self, response: httpx.Response) -> NoReturn:
        """A status that retrying this call will not change: credentials refused, or final."""
        status = response.status_code
        message = self._redact(
            permanent_message(status, response.reason_phrase, response.headers, response.text)
        )
        if status in AUTH_STATUSES:
            raise EndpointAuthError(message, status=status)
        raise PermanentEndpointError(message, status=status)

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self._key is not None:
            headers["authorization"] = f"Bearer {self._key}"
        elif self._tokens is not None:
            headers["authorization"] = f"Bearer {self._tokens.bearer()}"
        if self._endpoint.deployment:
            headers[DEPLOYMENT_HEADER] = self._endpoint.deployment
        return headers

    def _redact(self, message: str) -> str:
        """``message`` without the key, should a server ever echo it back."""
        return message.replace(self._key, "[key]") if self._key else message


def _concat(first: EmbedResult, second: EmbedResult) -> EmbedResult:
    scale = first.scaling_factor if first.scaling_factor is not None else second.scaling_factor
    return EmbedResult(
        image=np.concatenate([first.image, second.image]),
        text=np.concatenate([first.text, second.text]),
        scaling_factor=scale,
    )
