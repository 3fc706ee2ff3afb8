"""/readyz's "endpoint reachable" check: one cheap request, its answer kept for a while.

The local emulator is asked ``GET /healthz`` and must answer 200. A real (Azure ML) endpoint is
sent ``HEAD`` on its scoring URI, with no key: any HTTP answer, 401 and 405 included, means it
is reachable; a connection error, a TLS failure or a timeout means it is not. Each probe has a
``timeout`` (2 s) and its result is kept ``ttl`` seconds (30), so /readyz polled every second
costs the endpoint one request per 30 s per admin process, and a probe never runs twice at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

TIMEOUT_SECONDS = 2.0
TTL_SECONDS = 30.0


class EndpointProbe:
    """Callable: True while the endpoint at ``url`` was reachable at the last probe."""

    def __init__(
        self,
        url: str,
        *,
        healthz: bool,
        timeout: float = TIMEOUT_SECONDS,
        ttl: float = TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.healthz = healthz  # GET, 200 only (the emulator); else HEAD, any answer
        self._timeout = timeout
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._reachable = False
        self.probes = 0  # requests sent, for tests

    @classmethod
    def local_emulator(cls, base_url: str) -> EndpointProbe:
        return cls(f"{base_url}/healthz", healthz=True)

    @classmethod
    def scoring_uri(cls, url: str) -> EndpointProbe:
        return cls(url, healthz=False)

    def __call__(self) -> bool:
        with self._lock:
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= self._ttl:
                self._reachable = self._probe()
                self._checked_at = self._clock()
            return self._reachable

    def _probe(self) -> bool:
        self.probes += 1
        headers = {"user-agent": "pacs-embed readyz"}
        try:
            if self.healthz:
                answer = httpx.get(self.url, timeout=self._timeout, headers=headers)
                return answer.status_code == 200
            httpx.head(self.url, timeout=self._timeout, headers=headers)
            return True
        except (httpx.HTTPError, httpx.InvalidURL):  # refused, reset, TLS, timeout, bad URL
            return False
