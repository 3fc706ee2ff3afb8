"""The webhook sink: one signed JSON POST per study version.

Headers: ``Content-Type: application/json``, ``X-PacsEmbed-Signature: sha256=<hex>`` (the
HMAC-SHA256 of the raw body under the shared secret) and ``Idempotency-Key`` (also in the body,
see :func:`encode_body`), so a receiver can verify before it parses and drop a redelivery.
The signature covers the bytes as sent: a receiver that re-serialised the JSON could not check
it, so the body is encoded once, by the caller, and handed in as bytes.

What ``WebhookSink.send`` makes of the answer:

    2xx                                     done
    408, 429, 5xx                           TransientPushError (``retry_after`` from Retry-After)
    timeouts, refused or dropped connection TransientPushError
    other 1xx/3xx/4xx                       PermanentPushError "webhook answered HTTP 404"
    an unusable URL or request              PermanentPushError

Redirects are not followed: a POST redirected is a misconfigured URL, better fixed than chased.
Messages carry the status and the exception's type, never the receiver's body (it could quote
ours back).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

import httpx

from pipeline.embed.retry import retry_after_seconds
from pipeline.errors import ConfigError, PermanentPushError, TransientPushError
from pipeline.phi import PHI_KEYWORDS
from pipeline.sections import WebhookSinkSettings

SIGNATURE_HEADER = "X-PacsEmbed-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: The body field that repeats the idempotency key, for receivers that only keep bodies.
IDEMPOTENCY_FIELD = "idempotency_key"

#: Client errors that mean "not now" rather than "never": request timeout, throttling.
TRANSIENT_CLIENT_STATUSES = frozenset({408, 429})

#: Body keys refused whatever their spelling (``PatientName``, ``patient_name``, ``patient-name``).
_PHI_KEYS = frozenset(keyword.lower() for keyword in PHI_KEYWORDS)


def sign(body: bytes, secret: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of body under secret>``, the signature header's value."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: bytes, signature: str) -> bool:
    """What a receiver does: compare in constant time, so the signature cannot be guessed."""
    return hmac.compare_digest(sign(body, secret), signature)


def encode_body(payload: Mapping[str, Any], idempotency_key: str) -> bytes:
    """Compact UTF-8 JSON of ``payload`` plus the idempotency key, refusing patient fields.

    The refusal is a guard against a caller's mistake (a ValueError naming the key, never its
    value): patient name, ID, birth date and accession must not leave in a webhook.
    """
    _check_no_phi_keys(payload)
    document = {**payload, IDEMPOTENCY_FIELD: idempotency_key}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _check_no_phi_keys(value: Any, path: str = "$") -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if str(key).replace("_", "").replace("-", "").lower() in _PHI_KEYS:
                raise ValueError(f"webhook body must not hold patient data: {path}.{key}")
            _check_no_phi_keys(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_no_phi_keys(item, f"{path}[{index}]")


class WebhookSink:
    """POSTs signed bodies to one URL through an injected ``httpx.Client`` (its transport is
    the seam for tests; its connection pool is reused across sends)."""

    def __init__(
        self,
        url: str,
        secret: bytes | str,
        client: httpx.Client,
        timeout: float | httpx.Timeout = 10.0,
    ) -> None:
        if not secret:
            raise ValueError("a webhook secret is required: every body is signed")
        self._url = url
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self._client = client
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)

    @classmethod
    def from_settings(
        cls, settings: WebhookSinkSettings, secret: bytes | str, client: httpx.Client
    ) -> WebhookSink:
        """The sink of ``[sinks.webhook]``; the secret is read by the caller (env or file)."""
        if settings.url is None:
            raise ConfigError("sinks.webhook.url is not set: the webhook sink is off")
        return cls(settings.url, secret, client, settings.timeout_seconds)

    def send(self, body: bytes, idempotency_key: str) -> None:
        """POST ``body`` once; return when the receiver answered 2xx, else raise (see module)."""
        key = idempotency_key
        if not key or not key.isascii() or not key.isprintable():  # no CR/LF into a header
            raise ValueError("the idempotency key must be non-empty printable ASCII")
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, self._secret),
            IDEMPOTENCY_HEADER: idempotency_key,
        }
        try:
            response = self._client.post(
                self._url, content=body, headers=headers, timeout=self._timeout
            )
        except httpx.TimeoutException as exc:
            raise TransientPushError(f"webhook timed out ({type(exc).__name__})") from exc
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
            raise PermanentPushError(f"webhook request unusable ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:  # refused, reset, cut short, proxy
            raise TransientPushError(f"webhook unreachable ({type(exc).__name__})") from exc
        classify_response(response.status_code, response.headers)


def classify_response(status: int, headers: Mapping[str, str]) -> None:
    """Return for 2xx; raise TransientPushError or PermanentPushError otherwise (pure)."""
    if 200 <= status < 300:
        return
    message = f"webhook answered HTTP {status}"
    if status >= 500 or status in TRANSIENT_CLIENT_STATUSES:
        raise TransientPushError(message, status=status, retry_after=retry_after_seconds(headers))
    raise PermanentPushError(message, status=status)
