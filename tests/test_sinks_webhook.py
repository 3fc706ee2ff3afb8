"""The webhook sink: the classification table through httpx.MockTransport, then a real local
receiver that checks the signature with the shared secret and records the idempotency key."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from pydantic import SecretStr

from pipeline.errors import ConfigError, PermanentPushError, PushError, TransientPushError
from pipeline.sections import WebhookSinkSettings
from pipeline.sinks.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    WebhookSink,
    encode_body,
    sign,
    verify,
)
from tests.conftest import free_port
from tests.sinks_peers import HTTPReceiver, Recorded

SECRET = b"test-secret-not-a-real-one"
KEY = "1.2.3.4.5-v2"
BODY = encode_body({"study_instance_uid": "1.2.3.4.5", "version": 2, "outlier": False}, KEY)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as real:
        yield real


def _mock_sink(handler: httpx.MockTransport) -> WebhookSink:
    return WebhookSink("https://hooks.example/pacs-embed", SECRET, httpx.Client(transport=handler))


def test_sign_is_hmac_sha256_hex_of_the_raw_body() -> None:
    """The signature is ``sha256=`` + hex HMAC-SHA256 of the bytes (the well-known test vector)."""
    body = b"The quick brown fox jumps over the lazy dog"
    assert sign(body, b"key") == (
        "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    )
    assert verify(body, b"key", sign(body, b"key"))
    assert not verify(body + b" ", b"key", sign(body, b"key"))


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, None),
        (201, None),
        (204, None),
        (400, PermanentPushError),
        (401, PermanentPushError),
        (404, PermanentPushError),
        (408, TransientPushError),
        (409, PermanentPushError),
        (429, TransientPushError),
        (500, TransientPushError),
        (503, TransientPushError),
    ],
)
def test_status_classification(status: int, outcome: type[PushError] | None) -> None:
    """2xx done; 408, 429 and 5xx retried; every other 4xx dead-lettered with the status."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, text="patient CANARY^PHI said no")

    sink = _mock_sink(httpx.MockTransport(answer))
    if outcome is None:
        sink.send(BODY, KEY)
    else:
        with pytest.raises(outcome) as caught:
            sink.send(BODY, KEY)
        assert type(caught.value) is outcome
        assert caught.value.status == status
        assert str(caught.value) == f"webhook answered HTTP {status}"  # never the body
    (request,) = seen
    assert request.method == "POST" and request.content == BODY
    assert request.headers[SIGNATURE_HEADER] == sign(BODY, SECRET)
    assert request.headers[IDEMPOTENCY_HEADER] == KEY
    assert request.headers["content-type"] == "application/json"


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_kept(status: int) -> None:
    """The receiver's Retry-After (seconds) travels on the transient error for the back-off."""
    sink = _mock_sink(
        httpx.MockTransport(lambda r: httpx.Response(status, headers={"Retry-After": "7"}))
    )
    with pytest.raises(TransientPushError) as caught:
        sink.send(BODY, KEY)
    assert caught.value.retry_after == 7.0


@pytest.mark.parametrize(
    ("exception", "outcome"),
    [
        (httpx.ConnectTimeout("t"), TransientPushError),
        (httpx.ReadTimeout("t"), TransientPushError),
        (httpx.ConnectError("[Errno 111] Connection refused"), TransientPushError),
        (httpx.RemoteProtocolError("cut short"), TransientPushError),
        (httpx.UnsupportedProtocol("ftp"), PermanentPushError),
    ],
)
def test_exception_classification(exception: Exception, outcome: type[PushError]) -> None:
    """Timeouts and dropped or refused connections are retried; an unusable URL is not."""

    def fail(request: httpx.Request) -> httpx.Response:
        raise exception

    with pytest.raises(outcome) as caught:
        _mock_sink(httpx.MockTransport(fail)).send(BODY, KEY)
    assert type(caught.value) is outcome
    assert type(exception).__name__ in str(caught.value)


def test_body_carries_the_key_and_refuses_patient_fields() -> None:
    """The idempotency key is in the body too; patient fields are refused by name, any case."""
    assert json.loads(BODY)["idempotency_key"] == KEY
    for key in ("PatientName", "patient_id", "patient-birth-date", "ACCESSIONNUMBER"):
        with pytest.raises(ValueError, match=key) as caught:
            encode_body({"series": [{key: "CANARY^PHI"}]}, KEY)
        assert "CANARY" not in str(caught.value)


def test_bad_idempotency_key_is_refused() -> None:
    """An empty key, or one that would break the header line, is a caller's bug."""
    sink = _mock_sink(httpx.MockTransport(lambda r: httpx.Response(200)))
    for key in ("", "a\r\nX-Injected: 1", "clé"):
        with pytest.raises(ValueError, match="idempotency key"):
            sink.send(BODY, key)


def _verifying(secret: bytes) -> HTTPReceiver:
    """A receiver that answers 204 to a correctly signed body, 401 otherwise."""

    def answer(request: Recorded) -> tuple[int, dict[str, str], bytes]:
        ok = verify(request.body, secret, request.headers.get(SIGNATURE_HEADER, ""))
        return (204, {}, b"") if ok else (401, {}, b"bad signature")

    return HTTPReceiver(answer)


def test_real_receiver_verifies_signature_and_records_key(client: httpx.Client) -> None:
    """End to end over loopback: the receiver checks the HMAC with the secret and sees the key."""
    with _verifying(SECRET) as receiver:
        WebhookSink(f"{receiver.url}/hook", SECRET, client, timeout=5).send(BODY, KEY)
        (request,) = receiver.requests
        assert request.path == "/hook"
        assert request.headers[IDEMPOTENCY_HEADER] == KEY
        assert json.loads(request.body)["idempotency_key"] == KEY
        assert request.body == BODY


def test_real_receiver_with_another_secret_is_permanent(client: httpx.Client) -> None:
    """A receiver holding another secret answers 401: dead-lettered, the secret never shown."""
    with _verifying(b"another-secret") as receiver:
        sink = WebhookSink(f"{receiver.url}/hook", SECRET, client, timeout=5)
        with pytest.raises(PermanentPushError, match="HTTP 401") as caught:
            sink.send(BODY, KEY)
        assert SECRET.decode() not in str(caught.value)


def test_real_refused_connection_and_timeout_are_transient(client: httpx.Client) -> None:
    """A closed port, and a receiver slower than the timeout, are both retried later."""
    with pytest.raises(TransientPushError, match="ConnectError"):
        WebhookSink(f"http://127.0.0.1:{free_port()}/", SECRET, client, timeout=2).send(BODY, KEY)

    def slow(request: Recorded) -> tuple[int, dict[str, str], bytes]:
        time.sleep(2.0)
        return 200, {}, b""

    with HTTPReceiver(slow) as receiver:
        sink = WebhookSink(receiver.url, SECRET, client, timeout=0.2)
        started = time.monotonic()
        with pytest.raises(TransientPushError, match="ReadTimeout"):
            sink.send(BODY, KEY)
        assert time.monotonic() - started < 1.5  # gave up before the answer came


def test_from_settings_needs_a_url_and_a_secret(client: httpx.Client) -> None:
    """[sinks.webhook] off without a url; a url without a secret is refused at start-up."""
    with pytest.raises(ConfigError, match="off"):
        WebhookSink.from_settings(WebhookSinkSettings(), SECRET, client)
    with pytest.raises(ConfigError, match=r"sinks\.webhook: .*secret"):
        WebhookSinkSettings(url="https://hooks.example/")
    settings = WebhookSinkSettings(url="https://hooks.example/", secret=SecretStr(SECRET.decode()))
    assert isinstance(WebhookSink.from_settings(settings, SECRET, client), WebhookSink)
