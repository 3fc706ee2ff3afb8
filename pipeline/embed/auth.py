"""Microsoft Entra ID tokens for the endpoint: from azure-identity, cached, renewed early.

The client asks ``TokenCache.bearer()`` before every request. A token is fetched once and reused
until ``TOKEN_REFRESH_MARGIN`` seconds before it expires, so a request never leaves with a token
that lapses on the way; if renewing fails while the old token is still valid, the old one is used
and renewal is tried again on the next request (an IMDS hiccup must not stop the fleet).

Any object with azure-identity's ``get_token(*scopes)`` works (tests hand in a stub);
``entra_credential`` builds the real one from settings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from pipeline.errors import TransientEndpointError

log = structlog.get_logger(__name__)

#: Entra ID scope of Azure ML online endpoints.
AZURE_ML_SCOPE = "https://ml.azure.com/.default"

#: Fetch a new token this many seconds before the cached one expires.
TOKEN_REFRESH_MARGIN = 300.0

#: A cached token this close to expiry is never used, even when renewing it failed.
TOKEN_MIN_VALIDITY = 30.0


class AccessToken(Protocol):
    """azure-core's ``AccessToken``: the token and its expiry in seconds since the epoch."""

    @property
    def token(self) -> str: ...
    @property
    def expires_on(self) -> int: ...


class TokenCredential(Protocol):
    """The part of azure-identity's credential protocol this client uses."""

    def get_token(self, *scopes: str) -> AccessToken: ...


class TokenCache:
    """One credential's token for ``scope``, shared by every thread of the client."""

    def __init__(
        self,
        credential: TokenCredential,
        *,
        scope: str = AZURE_ML_SCOPE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._credential = credential
        self._scope = scope
        self._clock = clock
        self._token: AccessToken | None = None
        self._lock = threading.Lock()

    def bearer(self) -> str:
        """A valid token, renewed ``TOKEN_REFRESH_MARGIN`` s before it expires.

        Raises ``TransientEndpointError`` when no valid token can be had: a job retried later
        may find the identity service back.
        """
        with self._lock:
            now = self._clock()
            cached = self._token
            if cached is not None and now < cached.expires_on - TOKEN_REFRESH_MARGIN:
                return cached.token
            try:
                fresh = self._credential.get_token(self._scope)
            except Exception as exc:  # azure-identity raises several unrelated types
                if cached is not None and now < cached.expires_on - TOKEN_MIN_VALIDITY:
                    log.warning("endpoint.token_refresh_failed", error=type(exc).__name__)
                    return cached.token
                raise TransientEndpointError(
                    f"could not get an Entra token for {self._scope}: {type(exc).__name__}"
                ) from exc
            self._token = fresh
            return fresh.token


def entra_credential(managed_identity_client_id: str | None = None) -> TokenCredential:
    """azure-identity's credential: a user-assigned managed identity when its client id is given,
    else ``DefaultAzureCredential`` (environment, workload identity, managed identity, CLI...).

    Imported here, not at module load, so key-only deployments never pay for azure-identity.
    """
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if managed_identity_client_id:
        credential: TokenCredential = ManagedIdentityCredential(
            client_id=managed_identity_client_id
        )
        return credential
    default: TokenCredential = DefaultAzureCredential()
    return default
