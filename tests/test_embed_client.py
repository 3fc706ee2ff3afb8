"""The endpoint client's HTTP behaviour, against httpx.MockTransport (no sockets, no sleeping)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from structlog.testing import capture_logs

from pipeline.embed.client import AZURE_ML_SCOPE, EndpointClient
from pipeline.embed.contract import EMBEDDING_DIM, Row
from pipeline.errors import (
    ConfigError,
    EndpointAuthError,
    PermanentEndpointError,
    ResponseFormatError,
    TransientEndpointError,
)
from pipeline.sections import EndpointSettings
from tests.test_embed_auth import StubCredential, Token

URL = "https://example-endpoint.westeurope.inference.ml.azure.com/score"
KEY = "s3cr3t-key-value"

Handler = Callable[[httpx.Request], httpx.Response]

#: [endpoint] keys a test may set; the key itself reaches the client already read.
TUNING = set(EndpointSettings.model_fields) - {"url", "key"}


def feature_for(b64: str) -> list[float]:
    """A fake embedding derived from the request's own row, so order can be checked."""
    seed = int.from_bytes(hashlib.sha256(b64.encode()).digest()[:8], "little")
    values: list[float] = np.random.default_rng(seed).standard_normal(EMBEDDING_DIM).tolist()
    return values


def ok_response(request: httpx.Request) -> httpx.Response:
    """Answer like a real deployment: one object per row with nested image features."""
    data = json.loads(request.content)["input_data"]["data"]
    rows = [{"image_features": [feature_for(img)], "scaling_factor": 4.51} for img, _ in data]
    return httpx.Response(200, json=rows)


@dataclass
class Recorder:
    """A scripted endpoint: pops one handler per request, then answers OK."""

    script: list[Handler | int] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script.pop(0) if self.script else ok_response
        if isinstance(step, int):
            return httpx.Response(step, json={"message": f"status {step}"})
        return step(request)


@dataclass
class Sleeps:
    """Records requested sleeps instead of sleeping."""

    delays: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def make_client(recorder: Recorder, sleeps: Sleeps, **kwargs: Any) -> EndpointClient:
    """A client of URL; ``kwargs`` are [endpoint] settings (max_attempts=3...) or client
    arguments (key, credential)."""
    kwargs.setdefault("key", KEY)
    settings = {name: kwargs.pop(name) for name in list(kwargs) if name in TUNING}
    return EndpointClient(
        EndpointSettings(url=URL, **settings),
        transport=httpx.MockTransport(recorder),
        sleep=sleeps,
        rng=random.Random(7),
        **kwargs,
    )


def pngs(n: int) -> list[bytes]:
    return [f"png-{i}".encode() for i in range(n)]


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client_factory(sleeps: Sleeps) -> Iterator[Callable[..., EndpointClient]]:
    made: list[EndpointClient] = []

    def factory(recorder: Recorder, **kwargs: Any) -> EndpointClient:
        client = make_client(recorder, sleeps, **kwargs)
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()


def test_embed_images_returns_unit_vectors(client_factory: Callable[..., EndpointClient]) -> None:
    """A 200 answer becomes an (n, 1024) float32 matrix of unit vectors."""
    recorder = Recorder()
    vectors = client_factory(recorder).embed_images(pngs(3))
    assert vectors.shape == (3, EMBEDDING_DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    assert len(recorder.requests) == 1


def test_key_sent_as_bearer_and_deployment_header(
    client_factory: Callable[..., EndpointClient],
) -> None:
    """Key mode sends Authorization: Bearer <key>, plus azureml-model-deployment when set."""
    recorder = Recorder()
    client_factory(recorder, deployment="medimageinsight-v1").embed_images(pngs(1))
    request = recorder.requests[0]
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["azureml-model-deployment"] == "medimageinsight-v1"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content)["params"] == {"get_scaling_factor": True}


def test_no_deployment_header_by_default(client_factory: Callable[..., EndpointClient]) -> None:
    """Without a deployment the endpoint's traffic split decides, so no header is sent."""
    recorder = Recorder()
    client_factory(recorder).embed_images(pngs(1))
    assert "azureml-model-deployment" not in recorder.requests[0].headers


def test_429_retry_after_is_honoured(
    client_factory: Callable[..., EndpointClient], sleeps: Sleeps
) -> None:
    """A 429 with Retry-After waits at least that long, then the retry succeeds."""
    recorder = Recorder([lambda r: httpx.Response(429, headers={"Retry-After": "7"})])
    with capture_logs() as logs:
        vectors = client_factory(recorder).embed_images(pngs(2))
    assert vectors.shape == (2, EMBEDDING_DIM)
    assert len(recorder.requests) == 2
    assert sleeps.delays == [7.0]  # the jittered delay (<= 0.5 s) is smaller than the hint
    retry = [entry for entry in logs if entry["event"] == "endpoint.retry"]
    assert retry and retry[0]["status"] == 429 and retry[0]["delay"] == 7.0
    assert KEY not in repr(logs)


def test_503_then_success_uses_jittered_backoff(
    client_factory: Callable[..., EndpointClient], sleeps: Sleeps
) -> None:
    """503 is retried after a full-jitter delay within base * 2**attempt."""
    recorder = Recorder([503, 503])
    client_factory(recorder).embed_images(pngs(1))
    assert len(recorder.requests) == 3
    assert 0 <= sleeps.delays[0] <= 0.5
    assert 0 <= sleeps.delays[1] <= 1.0


def test_transport_error_then_success(
    client_factory: Callable[..., EndpointClient], sleeps: Sleeps
) -> None:
    """A refused connection or a timeout is transient: retried, then the answer is used."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def time_out(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    recorder = Recorder([refuse, time_out])
    vectors = client_factory(recorder).embed_images(pngs(1))
    assert vectors.shape == (1, EMBEDDING_DIM)
    assert len(recorder.requests) == 3
    assert len(sleeps.delays) == 2


def test_gives_up_after_max_attempts(
    client_factory: Callable[..., EndpointClient], sleeps: Sleeps
) -> None:
    """After max_attempts transient failures a TransientEndpointError carries status and hint."""
    recorder = Recorder([lambda r: httpx.Response(503, headers={"Retry-After": "2"})] * 10)
    with pytest.raises(TransientEndpointError) as caught:
        client_factory(recorder, max_attempts=3).embed_images(pngs(1))
    assert len(recorder.requests) == 3
    assert len(sleeps.delays) == 2
    assert caught.value.status == 503
    assert caught.value.retry_after == 2.0
    assert "failed 3 time(s)" in str(caught.value)
    assert KEY not in str(caught.value)


def test_deadline_bounds_the_retries(client_factory: Callable[..., EndpointClient]) -> None:
    """No retry is attempted when its wait would end past the total deadline."""
    recorder = Recorder([lambda r: httpx.Response(429, headers={"Retry-After": "120"})] * 10)
    with pytest.raises(TransientEndpointError, match="deadline") as caught:
        client_factory(recorder, deadline=60.0).embed_images(pngs(1))
    assert len(recorder.requests) == 1
    assert caught.value.retry_after == 120.0


def test_413_splits_the_batch_and_preserves_order(
    client_factory: Callable[..., EndpointClient],
) -> None:
    """413 halves the batch recursively; results are concatenated in the original row order."""

    def small_only(request: httpx.Request) -> httpx.Response:
        if len(json.loads(request.content)["input_data"]["data"]) > 2:
            return httpx.Response(413, text="too large")
        return ok_response(request)

    recorder = Recorder([small_only] * 5)
    images = pngs(5)
    vectors = client_factory(recorder).embed_images(images)
    sizes = [len(json.loads(r.content)["input_data"]["data"]) for r in recorder.requests]
    assert sizes == [5, 2, 3, 1, 2]  # 5 -> 2 + 3 -> 2 + (1 + 2)
    expected = [feature_for(base64.b64encode(png).decode()) for png in images]
    expected_unit = np.asarray(expected) / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, expected_unit, rtol=1e-5, atol=1e-6)


def test_413_on_a_single_row_is_permanent(client_factory: Callable[..., EndpointClient]) -> None:
    """A single row the endpoint calls too large cannot be split: PermanentEndpointError."""
    recorder = Recorder([413])
    with pytest.raises(PermanentEndpointError, match="413") as caught:
        client_factory(recorder).embed_images(pngs(1))
    assert caught.value.status == 413


def test_400_is_permanent_with_the_server_message(
    client_factory: Callable[..., EndpointClient], sleeps: Sleeps
) -> None:
    """A 400 is not retried; the error carries the status and the server's (trimmed) body."""
    body = "input_data.data[0] is not a valid image " + "x" * 2000
    recorder = Recorder([lambda r: httpx.Response(400, text=body)])
    with pytest.raises(PermanentEndpointError) as caught:
        client_factory(recorder).embed_images(pngs(1))
    message = str(caught.value)
    assert caught.value.status == 400
    assert "400" in message
    assert "is not a valid image" in message
    assert len(message) < 700
    assert len(recorder.requests) == 1
    assert sleeps.delays == []


def test_424_carries_model_error_headers(client_factory: Callable[..., EndpointClient]) -> None:
    """A 424 model error names the ms-azureml-model-error-* header values and the body."""
    headers = {
        "ms-azureml-model-error-reason": "model_error",
        "ms-azureml-model-error-statuscode": "500",
    }
    recorder = Recorder([lambda r: httpx.Response(424, headers=headers, text="CUDA out of memory")])
    with pytest.raises(PermanentEndpointError) as caught:
        client_factory(recorder).embed_images(pngs(1))
    message = str(caught.value)
    assert caught.value.status == 424
    assert "ms-azureml-model-error-reason=model_error" in message
    assert "ms-azureml-model-error-statuscode=500" in message
    assert "CUDA out of memory" in message


def test_key_never_appears_in_error_messages(
    client_factory: Callable[..., EndpointClient],
) -> None:
    """Even a server echoing the Authorization header back does not put the key in the error."""
    recorder = Recorder(
        [lambda r: httpx.Response(401, text=f"bad header: {r.headers['authorization']}")]
    )
    with pytest.raises(EndpointAuthError) as caught:
        client_factory(recorder).embed_images(pngs(1))
    assert caught.value.status == 401
    assert KEY not in str(caught.value)
    assert "[key]" in str(caught.value)


def test_truncated_200_body_is_retried(
    client_factory: Callable[..., EndpointClient], sleeps: Sleeps
) -> None:
    """A 200 whose body is not JSON (cut short, a proxy page) is retried like a 5xx."""
    recorder = Recorder([lambda r: httpx.Response(200, text='[{"image_features": [[0.1')])
    vectors = client_factory(recorder).embed_images(pngs(2))
    assert vectors.shape == (2, EMBEDDING_DIM)
    assert len(recorder.requests) == 2 and len(sleeps.delays) == 1


def test_truncated_200_body_every_time_is_transient(
    client_factory: Callable[..., EndpointClient],
) -> None:
    """A body that never parses exhausts the attempts as a transient error naming the cause."""
    truncated: Handler = lambda r: httpx.Response(200, text="[{")  # noqa: E731
    recorder = Recorder([truncated] * 3)
    with pytest.raises(TransientEndpointError, match="not JSON"):
        client_factory(recorder, max_attempts=3).embed_images(pngs(1))


def test_short_json_answer_is_a_response_format_error(
    client_factory: Callable[..., EndpointClient],
) -> None:
    """Valid JSON that breaks the contract (too few rows) is a ResponseFormatError, not retried."""
    recorder = Recorder([lambda r: httpx.Response(200, json=[])])
    with pytest.raises(ResponseFormatError, match="0 row objects for 2 rows"):
        client_factory(recorder).embed_images(pngs(2))
    assert len(recorder.requests) == 1


def test_empty_batch_makes_no_request(client_factory: Callable[..., EndpointClient]) -> None:
    """Embedding nothing returns empty matrices without calling the endpoint."""
    recorder = Recorder()
    result = client_factory(recorder).embed([])
    assert result.image.shape == (0, EMBEDDING_DIM)
    assert recorder.requests == []


def test_mixed_rows_round_trip(client_factory: Callable[..., EndpointClient]) -> None:
    """embed() sends images and texts together and returns row-aligned image and text matrices."""

    def answer(request: httpx.Request) -> httpx.Response:
        data = json.loads(request.content)["input_data"]["data"]
        out: list[dict[str, Any]] = []
        for img, text in data:
            row: dict[str, Any] = {"scaling_factor": 4.51}
            if img:
                row["image_features"] = [feature_for(img)]
            if text:
                row["text_features"] = feature_for(text)
            out.append(row)
        return httpx.Response(200, json=out)

    result = client_factory(Recorder([answer])).embed(
        [Row(image_png=b"a"), Row(text="x-ray chest"), Row(image_png=b"b", text="ct head")]
    )
    assert np.isfinite(result.image[[0, 2]]).all() and np.isnan(result.image[1]).all()
    assert np.isfinite(result.text[[1, 2]]).all() and np.isnan(result.text[0]).all()
    assert result.scaling_factor == 4.51


def test_credential_token_is_cached(client_factory: Callable[..., EndpointClient]) -> None:
    """A token far from expiry is fetched once for the ML scope and reused across requests."""
    credential = StubCredential([Token("tok-1", int(time.time()) + 3600)])
    recorder = Recorder()
    client = client_factory(recorder, key=None, credential=credential)
    client.embed_images(pngs(1))
    client.embed_images(pngs(1))
    assert credential.scopes == [(AZURE_ML_SCOPE,)]
    assert [r.headers["authorization"] for r in recorder.requests] == ["Bearer tok-1"] * 2


def test_credential_token_refreshed_near_expiry(
    client_factory: Callable[..., EndpointClient],
) -> None:
    """A token within five minutes of expiry is replaced before the next request."""
    now = int(time.time())
    credential = StubCredential([Token("tok-old", now + 120), Token("tok-new", now + 3600)])
    recorder = Recorder()
    client = client_factory(recorder, key=None, credential=credential)
    client.embed_images(pngs(1))
    client.embed_images(pngs(1))
    client.embed_images(pngs(1))
    assert len(credential.scopes) == 2
    assert [r.headers["authorization"] for r in recorder.requests] == [
        "Bearer tok-old",
        "Bearer tok-new",
        "Bearer tok-new",
    ]


def test_key_and_credential_are_exclusive() -> None:
    """Giving both a key and a credential is a configuration mistake, refused at once."""
    with pytest.raises(ValueError, match="either key or credential"):
        EndpointClient(URL, key=KEY, credential=StubCredential([]))


def test_client_takes_the_endpoint_section() -> None:
    """Timeouts, retries and deadline come from [endpoint] as one value, checked there by name;
    a bare URL means the defaults, and no URL is refused."""
    with pytest.raises(ConfigError, match=r"endpoint\.max_attempts"):
        EndpointSettings(url=URL, max_attempts=0)
    with pytest.raises(ConfigError, match=r"endpoint\.read_timeout"):
        EndpointSettings(url=URL, read_timeout=0)
    with pytest.raises(ConfigError, match=r"endpoint\.url is not set"):
        EndpointClient(EndpointSettings(), key=KEY)
    with EndpointClient(URL, key=KEY) as client:
        assert client._endpoint == EndpointSettings(url=URL)
