"""Entra ID auth and the in-flight limiter as the worker wires them (stub credentials, no Azure)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis

from emulator import EmulatorServer, EmulatorSettings
from pacs_embed.compose import build_client
from pipeline.embed import AZURE_ML_SCOPE, EndpointClient, RedisLimiter, TokenCache
from pipeline.errors import ConfigError, TransientEndpointError
from pipeline.keys import inflight_key
from pipeline.settings import Settings
from tests.test_emulator import gradient, png

TOKEN = "entra-token-1"  # noqa: S105 - a stub token, not a secret


@dataclass
class Token:
    token: str
    expires_on: int


@dataclass
class StubCredential:
    """azure-identity's TokenCredential protocol: scripted tokens (or errors), scopes recorded."""

    script: list[Token | Exception]
    scopes: list[tuple[str, ...]] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def get_token(self, *scopes: str) -> Token:
        self.scopes.append(scopes)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    """An emulator whose "key" is the Entra token, so only that bearer gets in."""
    server = EmulatorServer(EmulatorSettings(key=TOKEN), port=0)
    server.start_in_thread()
    yield server
    server.shutdown()


def patch_identity(monkeypatch: pytest.MonkeyPatch, name: str) -> list[StubCredential]:
    """Replace one azure-identity credential class by a stub; returns those it built."""
    import azure.identity

    built: list[StubCredential] = []

    def factory(**kwargs: Any) -> StubCredential:
        credential = StubCredential([Token(TOKEN, 4_000_000_000)], kwargs=kwargs)
        built.append(credential)
        return credential

    monkeypatch.setattr(azure.identity, name, factory)
    return built


def test_entra_with_managed_identity_client_id(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auth=entra with a client id uses that managed identity; its token opens the endpoint."""
    built = patch_identity(monkeypatch, "ManagedIdentityCredential")
    settings = Settings.load(
        endpoint={"url": emulator.url, "auth": "entra", "managed_identity_client_id": "abc-123"}
    )
    with build_client(settings) as client:
        client.embed_images([png(gradient(0.5))])
        client.embed_images([png(gradient(1.5))])
    assert [c.kwargs for c in built] == [{"client_id": "abc-123"}]
    assert built[0].scopes == [(AZURE_ML_SCOPE,)]  # fetched once, cached for the second call


def test_entra_without_client_id_uses_default_credential(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auth=entra without a client id goes through DefaultAzureCredential."""
    built = patch_identity(monkeypatch, "DefaultAzureCredential")
    settings = Settings.load(endpoint={"url": emulator.url, "auth": "entra"})
    with build_client(settings) as client:
        assert client.embed_images([png(gradient(0.5))]).shape == (1, 1024)
    assert len(built) == 1 and built[0].kwargs == {}


def test_key_mode_needs_a_key_and_entra_refuses_one() -> None:
    """A missing key (auth=key) or a stray key (auth=entra) stops the worker with a clear error."""
    url = "http://127.0.0.1:9/score"
    with pytest.raises(ConfigError, match="no key is set"):
        build_client(Settings.load(endpoint={"url": url}))
    with pytest.raises(ConfigError, match="key is set as well"):
        build_client(Settings.load(endpoint={"url": url, "auth": "entra", "key": "k"}))
    with build_client(Settings.load(endpoint={"url": url, "auth": "none"})):
        pass


def test_token_renewed_before_expiry_and_kept_when_renewal_fails() -> None:
    """A token is renewed 5 min before expiry; if renewal fails, the still-valid one is used."""
    now = [1_000_000.0]
    credential = StubCredential(
        [Token("t1", 1_000_000 + 600), RuntimeError("IMDS down"), Token("t2", 1_000_000 + 4000)]
    )
    cache = TokenCache(credential, clock=lambda: now[0])
    assert cache.bearer() == "t1"
    now[0] += 200  # 400 s left: outside the 300 s margin, reused
    assert cache.bearer() == "t1" and len(credential.scopes) == 1
    now[0] += 200  # 200 s left: renew; it fails, t1 is still valid
    assert cache.bearer() == "t1" and len(credential.scopes) == 2
    assert cache.bearer() == "t2" and len(credential.scopes) == 3


def test_no_token_at_all_is_transient() -> None:
    """Without any valid token, the identity failure is transient (the job is retried later)."""
    cache = TokenCache(StubCredential([RuntimeError("no identity")]))
    with pytest.raises(TransientEndpointError, match=r"Entra token for https://ml\.azure\.com"):
        cache.bearer()


@dataclass
class FakeLimiter:
    """Grants ``grants`` leases, then none; logs acquire/release around the requests."""

    grants: int
    events: list[str]
    limit: int = 1

    def acquire(self, timeout: float) -> FakeLimiter.Lease | None:
        if self.grants == 0:
            return None
        self.grants -= 1
        self.events.append("acquire")
        return FakeLimiter.Lease(self.events)

    @dataclass
    class Lease:
        events: list[str]

        def release(self) -> None:
            self.events.append("release")


def test_each_attempt_holds_a_slot_only_while_on_the_wire() -> None:
    """A slot is taken per attempt and given back before the back-off sleep."""
    events: list[str] = []
    answers = iter([httpx.Response(503), None])

    def handler(request: httpx.Request) -> httpx.Response:
        events.append("post")
        answer = next(answers)
        if answer is not None:
            return answer
        return httpx.Response(200, json=[{"image_features": [[1.0] * 1024]}])

    with EndpointClient(
        "http://127.0.0.1:9/score",
        transport=httpx.MockTransport(handler),
        limiter=FakeLimiter(5, events),
        sleep=lambda s: events.append("sleep"),
        rng=random.Random(1),
    ) as client:
        client.embed_images([b"png"])
    assert events == ["acquire", "post", "release", "sleep", "acquire", "post", "release"]


def test_no_slot_before_the_deadline_is_transient() -> None:
    """When no slot comes free in time, nothing is sent and the error is transient."""
    events: list[str] = []
    with EndpointClient(
        "http://127.0.0.1:9/score",
        transport=httpx.MockTransport(lambda r: httpx.Response(200)),
        limiter=FakeLimiter(0, events),
    ) as client:
        with pytest.raises(TransientEndpointError, match="no in-flight slot"):
            client.embed_images([b"png"])
    assert events == []


def test_worker_client_uses_the_shared_limiter(redis_conn: redis.Redis) -> None:
    """build_client's limiter is sized concurrency x instances, and max_in_flight = 0 drops it."""
    url = "http://127.0.0.1:9/score"  # discard port: refused at once if a request is sent
    common = {"url": url, "auth": "none", "deadline": 0.3, "max_attempts": 1}
    sized = Settings.load(
        endpoint={**common, "max_concurrent_requests_per_instance": 2, "instances": 3}
    )
    others = RedisLimiter(redis_conn, inflight_key(url), 6)
    held = [others.acquire(1) for _ in range(6)]  # the rest of the fleet holds every slot
    try:
        with build_client(sized, redis_conn) as client:
            with pytest.raises(TransientEndpointError, match="fleet-wide limit 6"):
                client.embed_images([b"png"])
        unlimited = Settings.load(endpoint={**common, "max_in_flight": 0})
        with build_client(unlimited, redis_conn) as client:
            with pytest.raises(TransientEndpointError, match="ConnectError"):
                client.embed_images([b"png"])
    finally:
        for lease in held:
            assert lease is not None
            lease.release()
