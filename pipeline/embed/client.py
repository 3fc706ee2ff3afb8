"""The HTTP client of the MedImageInsight online endpoint (DESIGN §5).

One ``embed(rows)`` call is one logical request: it retries transient failures (408, 429, 5xx,
dropped connections, timeouts) with full-jitter exponential back-off that honours ``Retry-After``,
splits the batch in half on 413, and maps everything else to the ``EndpointError`` tree:

    TransientEndpointError   still failing after max_attempts or past the deadline: retry the job
    PermanentEndpointError   401/403/400/404/424/...: the server's message is the quarantine reason
    ResponseFormatError      a 2xx answer that does not fit the contract (see contract.py)

The key is sent only in the ``Authorization`` header; it never appears in a log line or a message.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, NoReturn, Protocol

import httpx
import numpy as np
import structlog

from pipeline.embed.contract import EMBEDDING_DIM, EmbedResult, Matrix, Row, build_request
from pipeline.embed.contract import parse_response as parse_contract_response
from pipeline.embed.retry import (
    TOO_LARGE_STATUS,
    TRANSIENT_STATUSES,
    model_error_details,
    next_delay,
    retry_after_seconds,
)
from pipeline.errors import (
    PermanentEndpointError,
    ResponseFormatError,
    TransientEndpointError,
)

log = structlog.get_logger(__name__)

#: Entra ID scope of Azure ML online endpoints.
AZURE_ML_SCOPE = "https://ml.azure.com/.default"

#: Fetch a new token this many seconds before the cached one expires.
TOKEN_REFRESH_MARGIN = 300.0

#: How much of the server's error body goes into a PermanentEndpointError message.
MAX_ERROR_BODY_CHARS = 500

#: Header that routes a request to one deployment behind the endpoint.
DEPLOYMENT_HEADER = "azureml-model-deployment"


class _AccessToken(Protocol):
    @property
    def token(self) -> str: ...
    @property
    def expires_on(self) -> int: ...


class TokenCredential(Protocol):
    """The part of azure-identity's credential protocol this client uses."""

    def get_token(self, *scopes: str) -> _AccessToken: ...


class _TooLarge(Exception):
    """The endpoint answered 413 for this batch; the caller splits it."""


class EndpointClient:
    """Synchronous, thread-safe client of one scoring URI. Close it (or use ``with``)."""

    def __init__(
        self,
        url: str,
        *,
        key: str | None = None,
        credential: Any | None = None,
        deployment: str | None = None,
        transport: httpx.BaseTransport | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        max_attempts: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        deadline: float = 600.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if key is not None and credential is not None:
            raise ValueError("give either key or credential, not both")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("read_timeout", read_timeout),
            ("backoff_base", backoff_base),
            ("backoff_max", backoff_max),
            ("deadline", deadline),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self._url = url
        self._key = key or None
        self._credential: TokenCredential | None = credential
        self._deployment = deployment
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._deadline = deadline
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._clock = clock
        self._token: _AccessToken | None = None
        self._token_lock = threading.Lock()
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
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
        return self._embed(rows, self._clock() + self._deadline)

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
        failure, status, retry_after = "no attempt made", None, None
        attempts = 0
        while attempts < self._max_attempts:
            remaining = deadline_at - self._clock()
            if remaining <= 0:
                break
            attempts += 1
            try:
                response = self._http.post(
                    self._url,
                    content=content,
                    headers=self._headers(),
                    timeout=httpx.Timeout(
                        min(self._read_timeout, remaining),
                        connect=min(self._connect_timeout, remaining),
                    ),
                )
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                raise PermanentEndpointError(f"endpoint URL unusable: {exc}") from exc
            except httpx.TransportError as exc:
                failure, status, retry_after = type(exc).__name__, None, None
            else:
                if response.is_success:
                    return self._parse(response, rows)
                if response.status_code == TOO_LARGE_STATUS:
                    raise _TooLarge
                if response.status_code not in TRANSIENT_STATUSES:
                    self._raise_permanent(response)
                status = response.status_code
                failure, retry_after = f"HTTP {status}", retry_after_seconds(response.headers)
            if attempts >= self._max_attempts:
                break
            delay = next_delay(
                attempts - 1,
                retry_after,
                base=self._backoff_base,
                cap=self._backoff_max,
                rng=self._rng,
            )
            if self._clock() + delay >= deadline_at:
                failure += f"; next wait of {delay:.1f} s would pass the deadline"
                break
            log.warning(
                "endpoint.retry",
                status=status,
                error=failure,
                attempt=attempts,
                delay=round(delay, 3),
                retry_after=retry_after,
            )
            self._sleep(delay)
        raise TransientEndpointError(
            self._redact(
                f"endpoint failed {attempts} time(s) (max_attempts {self._max_attempts}, "
                f"deadline {self._deadline:g} s): {failure}"
            ),
            status=status,
            retry_after=retry_after,
        )

    def _parse(self, response: httpx.Response, rows: list[Row]) -> EmbedResult:
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError) as exc:
            snippet = response.text[:80]
            raise ResponseFormatError(
                f"HTTP {response.status_code} body is not JSON ({exc}): {snippet!r}",
                status=response.status_code,
            ) from None
        return parse_contract_response(body, rows)

    def _raise_permanent(self, response: httpx.Response) -> NoReturn:
        status = response.status_code
        parts = [f"endpoint answered {status} {response.reason_phrase}".rstrip()]
        details = model_error_details(response.headers)
        if details:
            parts.append("; ".join(details))
        text = response.text.strip()
        if text:
            if len(text) > MAX_ERROR_BODY_CHARS:
                text = text[:MAX_ERROR_BODY_CHARS] + "..."
            parts.append(text)
        raise PermanentEndpointError(self._redact(": ".join(parts)), status=status)

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self._key is not None:
            headers["authorization"] = f"Bearer {self._key}"
        elif self._credential is not None:
            headers["authorization"] = f"Bearer {self._bearer_token()}"
        if self._deployment:
            headers[DEPLOYMENT_HEADER] = self._deployment
        return headers

    def _bearer_token(self) -> str:
        """A cached Entra token, fetched again ``TOKEN_REFRESH_MARGIN`` s before it expires."""
        assert self._credential is not None
        with self._token_lock:
            now = time.time()
            cached = self._token
            if cached is not None and now < cached.expires_on - TOKEN_REFRESH_MARGIN:
                return cached.token
            try:
                self._token = self._credential.get_token(AZURE_ML_SCOPE)
            except Exception as exc:
                if cached is not None and now < cached.expires_on - 30:
                    log.warning("endpoint.token_refresh_failed", error=type(exc).__name__)
                    return cached.token  # still valid: refresh again on the next request
                raise TransientEndpointError(
                    f"could not get an Entra token for {AZURE_ML_SCOPE}: {type(exc).__name__}"
                ) from exc
            return self._token.token

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
