"""The local emulator endpoint, over real HTTP on 127.0.0.1 (ephemeral ports), with the client."""

from __future__ import annotations

import http.client
import io
import random
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from emulator import EMULATOR_HEADER, EMULATOR_HEADER_VALUE, EmulatorServer, EmulatorSettings, model
from pipeline.embed import EMBEDDING_DIM, EndpointClient, Row
from pipeline.errors import ConfigError, EndpointAuthError

KEY = "emulator-test-key"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def gradient(angle: float, size: int = 128) -> np.ndarray:
    """An 8-bit image with a linear ramp in direction ``angle`` (radians)."""
    y, x = np.mgrid[0:size, 0:size] / size
    ramp = np.cos(angle) * x + np.sin(angle) * y
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    image: np.ndarray = (ramp * 255).astype(np.uint8)
    return image


class FaultOnce(httpx.HTTPTransport):
    """Adds the fault-injection headers to the first request only, like a one-off server hiccup."""

    def __init__(self, fault: str, retry_after: str | None = None) -> None:
        super().__init__()
        self.headers = {"x-emulator-fault": fault}
        if retry_after is not None:
            self.headers["x-emulator-retry-after"] = retry_after
        self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.requests == 1:
            request.headers.update(self.headers)
        return super().handle_request(request)


def start(key: str | None = None, response_shape: str = "rows") -> EmulatorServer:
    server = EmulatorServer(EmulatorSettings(key=key, response_shape=response_shape), port=0)
    server.start_in_thread()
    return server


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    server = start(key=KEY)
    yield server
    server.shutdown()


@pytest.fixture
def client(emulator: EmulatorServer) -> Iterator[EndpointClient]:
    with EndpointClient(emulator.url, key=KEY, sleep=lambda s: None) as endpoint:
        yield endpoint


def test_url_resolves_ephemeral_port(emulator: EmulatorServer) -> None:
    """With port 0 the URL names the port actually bound, on the /score path."""
    assert emulator.url.startswith("http://127.0.0.1:")
    assert emulator.url.endswith("/score")
    assert not emulator.url.startswith("http://127.0.0.1:0/")


def test_healthz_and_not_a_medical_model_header(emulator: EmulatorServer) -> None:
    """GET /healthz answers 200 and every response says it is not a medical model."""
    health = emulator.url.replace("/score", "/healthz")
    response = httpx.get(health)
    assert response.status_code == 200
    assert response.headers[EMULATOR_HEADER] == EMULATOR_HEADER_VALUE
    assert "not a medical model" in response.json()["model"]
    assert httpx.post(emulator.url, content=b"{}").headers[EMULATOR_HEADER] == EMULATOR_HEADER_VALUE


def test_identical_pngs_give_identical_unit_vectors(client: EndpointClient) -> None:
    """Same content -> same vector; vectors are 1024-d, float32 and of unit norm."""
    image = png(gradient(0.3))
    vectors = client.embed_images([image, image])
    assert vectors.shape == (2, EMBEDDING_DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors[0], vectors[1])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_different_images_give_different_vectors_and_keep_similarity(
    client: EndpointClient,
) -> None:
    """Different images embed apart; a slightly changed image stays closer than a different one."""
    base = gradient(0.3)
    noisy = np.clip(base.astype(int) + np.random.default_rng(1).integers(-8, 9, base.shape), 0, 255)
    other = gradient(2.5)
    vectors = client.embed_images([png(base), png(noisy.astype(np.uint8)), png(other)])
    assert not np.allclose(vectors[0], vectors[2])
    assert vectors[0] @ vectors[1] > 0.95
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_same_pixels_in_rgb_and_gray_embed_alike(client: EndpointClient) -> None:
    """Content, not encoding, decides: a gray image saved as RGB gives the same vector."""
    gray = gradient(1.0)
    rgb = np.stack([gray] * 3, axis=-1)
    vectors = client.embed_images([png(gray), png(rgb)])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)


def test_constant_image_gets_a_fixed_vector(client: EndpointClient) -> None:
    """A flat image embeds to one fixed unit vector instead of NaN."""
    black = np.zeros((64, 64), np.uint8)
    white = np.full((64, 64), 255, np.uint8)
    vectors = client.embed_images([png(black), png(white)])
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)


def test_text_embeddings_are_deterministic(client: EndpointClient) -> None:
    """Text vectors depend only on the lower-cased words; other words give other vectors."""
    result = client.embed(
        [Row(text="X-ray chest AP"), Row(text="x-ray  CHEST ap"), Row(text="ct head axial")]
    )
    assert np.isnan(result.image).all()
    np.testing.assert_array_equal(result.text[0], result.text[1])
    assert not np.allclose(result.text[0], result.text[2])
    np.testing.assert_allclose(result.text[0], model.embed_text("x-ray chest ap"), rtol=1e-6)
    assert result.scaling_factor == model.SCALING_FACTOR


def test_text_is_cut_like_clip() -> None:
    """Only the first 77 tokens of a text count, as with the real model's context."""
    long = " ".join(f"w{i}" for i in range(200))
    assert len(model.tokens(long)) == model.MAX_TEXT_TOKENS
    np.testing.assert_array_equal(
        model.embed_text(long), model.embed_text(" ".join(f"w{i}" for i in range(77)))
    )


def test_mixed_rows_follow_row_level_fields(client: EndpointClient) -> None:
    """Rows with "" for image or text get only the features they asked for."""
    image = png(gradient(0.7))
    result = client.embed([Row(image_png=image), Row(text="chest"), Row(image_png=image, text="x")])
    assert np.isfinite(result.image[[0, 2]]).all() and np.isnan(result.image[1]).all()
    assert np.isfinite(result.text[[1, 2]]).all() and np.isnan(result.text[0]).all()
    np.testing.assert_array_equal(result.image[0], result.image[2])


def test_wrong_key_is_an_auth_error_401(emulator: EmulatorServer) -> None:
    """A wrong key gets 401: an auth error (the job retries later), without leaking the key."""
    with EndpointClient(emulator.url, key="wrong-key", sleep=lambda s: None) as client:
        with pytest.raises(EndpointAuthError) as caught:
            client.embed_images([png(gradient(0.1))])
    assert caught.value.status == 401
    assert "invalid key" in str(caught.value)
    assert "wrong-key" not in str(caught.value)


def test_malformed_request_is_400_with_a_message(emulator: EmulatorServer) -> None:
    """A body that does not fit the contract gets 400 and a message that says why."""
    headers = {"Authorization": f"Bearer {KEY}"}
    bad_png = {"input_data": {"columns": ["image", "text"], "index": [0], "data": [["aGk=", ""]]}}
    response = httpx.post(emulator.url, json=bad_png, headers=headers)
    assert response.status_code == 400
    assert "row 0" in response.json()["message"]
    response = httpx.post(emulator.url, content=b"not json", headers=headers)
    assert response.status_code == 400
    assert "not JSON" in response.json()["message"]


def test_fault_503_is_retried_then_succeeds(emulator: EmulatorServer) -> None:
    """An injected 503 with Retry-After is retried by the client, honouring the hint."""
    delays: list[float] = []
    transport = FaultOnce("503", retry_after="2")
    with EndpointClient(
        emulator.url, key=KEY, transport=transport, sleep=delays.append, rng=random.Random(1)
    ) as client:
        vectors = client.embed_images([png(gradient(0.2))])
    assert vectors.shape == (1, EMBEDDING_DIM)
    assert transport.requests == 2
    assert delays == [2.0]


def test_fault_malformed_is_retried_not_shifted(emulator: EmulatorServer) -> None:
    """An injected truncated body is retried; the vectors then come from a complete answer."""
    image = png(gradient(0.2))
    transport = FaultOnce("malformed")
    with EndpointClient(emulator.url, key=KEY, transport=transport, sleep=lambda s: None) as client:
        vectors = client.embed_images([image])
    assert transport.requests == 2
    np.testing.assert_allclose(vectors[0], model.embed_image(image), rtol=1e-6)


def test_fault_413_makes_the_client_split(emulator: EmulatorServer) -> None:
    """An injected 413 on the first request makes the client split the batch, keeping order."""
    images = [png(gradient(a)) for a in (0.1, 1.1, 2.1)]
    with EndpointClient(emulator.url, key=KEY) as plain:
        expected = plain.embed_images(images)
    transport = FaultOnce("413")
    with EndpointClient(emulator.url, key=KEY, transport=transport) as client:
        vectors = client.embed_images(images)
    assert transport.requests == 3
    np.testing.assert_array_equal(vectors, expected)


def test_columns_shape_parses_to_the_same_vectors(emulator: EmulatorServer) -> None:
    """The documentation's object-of-lists shape gives the same embeddings as the rows shape."""
    rows = [
        Row(image_png=png(gradient(0.4))),
        Row(text="mr knee"),
        Row(image_png=png(gradient(1.9))),
    ]
    columns = start(response_shape="columns")
    try:
        raw = httpx.post(
            columns.url,
            json={"input_data": {"columns": ["image", "text"], "index": [0], "data": [["", "a"]]}},
        )
        assert isinstance(raw.json(), dict)
        with EndpointClient(columns.url) as client:
            got = client.embed(rows)
    finally:
        columns.shutdown()
    with EndpointClient(emulator.url, key=KEY) as client:
        want = client.embed(rows)
    np.testing.assert_array_equal(got.image, want.image)
    np.testing.assert_array_equal(got.text, want.text)


def test_keep_alive_connection_is_reused(emulator: EmulatorServer) -> None:
    """Requests on one HTTP/1.1 connection reuse it: every answer has a Content-Length."""
    url = httpx.URL(emulator.url)
    connection = http.client.HTTPConnection(url.host, url.port, timeout=5)
    try:
        connection.request("GET", "/healthz")
        first = connection.getresponse()
        first.read()
        sock = connection.sock
        connection.request("POST", "/score", body=b"{}", headers={"Authorization": f"Bearer {KEY}"})
        second = connection.getresponse()
        second.read()
        assert sock is not None and connection.sock is sock
        assert first.version == 11 and second.status == 400
        assert first.getheader("Content-Length") and second.getheader("Content-Length")
    finally:
        connection.close()


def test_config_rejects_unknown_shape() -> None:
    """An unknown response_shape is refused when the config is built."""
    with pytest.raises(ConfigError, match=r"emulator\.response_shape"):
        EmulatorSettings(response_shape="tensor")
