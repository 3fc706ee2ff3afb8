"""The emulator's deliberate misbehaviour, over real HTTP on 127.0.0.1 (NOT a medical model)."""

from __future__ import annotations

import base64
import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from emulator import EmulatorServer, EmulatorSettings, FaultPlan
from emulator.faults import TRUNCATED_BODY, draw
from pipeline.errors import ConfigError
from tests.test_emulator import KEY, gradient, png

Start = Callable[..., EmulatorServer]


def emulators(key: str, **defaults: Any) -> Iterator[Start]:
    """Yields a starter of emulators (port 0, ``key``, a fault plan over ``defaults``); stops
    every one it started when resumed. The body of the ``start`` fixtures."""
    servers: list[EmulatorServer] = []

    def make(**faults: Any) -> EmulatorServer:
        server = EmulatorServer(EmulatorSettings(key=key, **{**defaults, **faults}), port=0)
        server.start_in_thread()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()


@pytest.fixture
def start() -> Iterator[Start]:
    """Starts emulators with a fault plan on ephemeral ports; stops them all afterwards."""
    yield from emulators(KEY)


def body(images: int = 1) -> dict[str, Any]:
    data = [[base64.b64encode(png(gradient(0.1 * i))).decode(), ""] for i in range(images)]
    return {
        "input_data": {"columns": ["image", "text"], "index": list(range(images)), "data": data}
    }


def post(
    server: EmulatorServer, images: int = 1, headers: dict[str, str] | None = None
) -> httpx.Response:
    all_headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    return httpx.post(server.url, json=body(images), headers=all_headers, timeout=10)


def test_capacity_answers_429_past_the_limit(start: Start) -> None:
    """With capacity 1, a request arriving while another is in flight gets 429 at once."""
    server = start(capacity=1)

    def slow() -> None:
        with contextlib.suppress(httpx.HTTPError):  # cut short when the server stops
            post(server, headers={"x-emulator-latency-ms": "5000"})

    first = threading.Thread(target=slow)
    first.start()
    while server.stats.snapshot()["in_flight"] < 1:
        time.sleep(0.01)
    second = post(server)
    server.shutdown()  # wakes the slow request
    first.join(10)
    assert second.status_code == 429
    assert "capacity 1" in second.json()["message"]
    stats = server.stats.snapshot()
    assert stats["over_capacity"] == 1 and stats["max_in_flight"] == 1


def test_cold_start_answers_503_then_serves(start: Start) -> None:
    """During the cold start every request gets 503 (with the configured Retry-After)."""
    server = start(cold_start_seconds=0.3, retry_after_seconds=2)
    cold = post(server)
    assert cold.status_code == 503 and cold.headers["retry-after"] == "2"
    assert "cold start" in cold.json()["message"]
    deadline = time.monotonic() + 30
    while (warm := post(server)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert warm.status_code == 200
    assert server.stats.snapshot()["injected"]["cold_start"] >= 1


def test_forced_faults_by_header(start: Start) -> None:
    """Each x-emulator-fault value answers its status; 424 carries the model-error headers."""
    server = start()
    for fault, status in (("408", 408), ("429", 429), ("500", 500), ("503", 503), ("424", 424)):
        response = post(server, headers={"x-emulator-fault": fault, "x-emulator-retry-after": "1"})
        assert response.status_code == status, fault
        assert response.json()["message"].startswith("injected fault")
        assert ("retry-after" in response.headers) == (status in (429, 503))
    model_error = post(server, headers={"x-emulator-fault": "424"})
    assert model_error.headers["ms-azureml-model-error-reason"] == "model_error"
    malformed = post(server, headers={"x-emulator-fault": "malformed"})
    assert malformed.status_code == 200 and malformed.content == TRUNCATED_BODY
    assert post(server, headers={"x-emulator-fault": "teapot"}).status_code == 400


def test_hang_holds_until_the_client_gives_up(start: Start) -> None:
    """A hung request gets no answer until the client's read timeout; it is not left in flight."""
    server = start(rate_hang=1.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url,
            json=body(),
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=httpx.Timeout(0.3, connect=5),
        )
    stats = server.stats.snapshot()
    assert stats["injected"] == {"hang": 1}
    assert stats["in_flight"] == 0 and stats["statuses"] == {}


def test_latency_is_added_per_request_and_per_image(start: Start) -> None:
    """Configured latency (fixed + per image) delays the answer by at least that much."""
    server = start(latency_ms=100, latency_per_image_ms=50)
    began = time.monotonic()
    response = post(server, images=4)
    assert response.status_code == 200
    assert time.monotonic() - began >= 0.3  # a lower bound only: never flaky on a busy machine


def test_random_faults_follow_the_rates_and_the_seed() -> None:
    """draw() picks each fault at its rate; the same seed draws the same sequence."""
    plan = FaultPlan(rate_429=0.2, rate_503=0.1, rate_hang=0.05)
    rng = random.Random(3)
    many = Counter(draw(plan, rng) for _ in range(20000))
    assert abs(many["429"] / 20000 - 0.2) < 0.02
    assert abs(many["503"] / 20000 - 0.1) < 0.015
    assert abs(many[None] / 20000 - 0.65) < 0.02
    assert set(many) == {"429", "503", "hang", None}
    first, again = random.Random(9), random.Random(9)
    assert [draw(plan, first) for _ in range(50)] == [draw(plan, again) for _ in range(50)]


def test_stats_count_embedded_images_only_in_full_answers(start: Start) -> None:
    """images_embedded counts image rows of complete 200 answers, not of faulted ones."""
    server = start()
    assert post(server, images=3).status_code == 200
    post(server, images=2, headers={"x-emulator-fault": "malformed"})
    post(server, images=2, headers={"x-emulator-fault": "503"})
    stats = httpx.get(server.url.replace("/score", "/stats")).json()
    assert stats["images_embedded"] == 3
    assert stats["statuses"] == {"200": 2, "503": 1}


def test_fault_plan_validation() -> None:
    """Rates outside [0, 1], adding up past 1, or negative latencies are refused, by name."""
    with pytest.raises(ConfigError, match=r"emulator\.rate_429"):
        FaultPlan(rate_429=1.5)
    with pytest.raises(ConfigError, match="add up"):
        EmulatorSettings(rate_429=0.6, rate_500=0.6)
    with pytest.raises(ConfigError, match=r"emulator\.latency_ms"):
        FaultPlan(latency_ms=-1)


def test_cli_builds_the_fault_plan_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pacs-embed emulator` hands the [emulator] section, every fault setting in it, to the
    server as is: the section is the server's fault plan."""
    import emulator.server
    from pacs_embed import cli

    built: list[EmulatorSettings] = []

    class Recorder:
        def __init__(self, config: EmulatorSettings) -> None:
            built.append(config)

        def serve_forever(self) -> None:
            pass

        def shutdown(self) -> None:
            pass

    monkeypatch.setattr(emulator.server, "EmulatorServer", Recorder)
    monkeypatch.setattr(cli, "_interrupt_on_sigterm", lambda: None)  # keep pytest's handler
    monkeypatch.setattr(cli.logs, "configure", lambda *args: None)  # keep the test's logging
    settings = {
        "LATENCY_MS": "5",
        "LATENCY_PER_IMAGE_MS": "2",
        "CAPACITY": "3",
        "RATE_429": "0.1",
        "RATE_503": "0.2",
        "RATE_500": "0.05",
        "RATE_408": "0.04",
        "RATE_HANG": "0.03",
        "RATE_MALFORMED": "0.02",
        "RETRY_AFTER_SECONDS": "1.5",
        "COLD_START_SECONDS": "7",
        "HANG_SECONDS": "9",
        "SEED": "4",
    }
    for name, value in settings.items():
        monkeypatch.setenv(f"PACS_EMBED_EMULATOR__{name}", value)
    assert cli.main(["emulator"]) == 0
    assert built[0] == EmulatorSettings(
        latency_ms=5,
        latency_per_image_ms=2,
        capacity=3,
        rate_429=0.1,
        rate_503=0.2,
        rate_500=0.05,
        rate_408=0.04,
        rate_hang=0.03,
        rate_malformed=0.02,
        retry_after_seconds=1.5,
        cold_start_seconds=7,
        hang_seconds=9,
        seed=4,
    )


def test_cli_refuses_rates_adding_up_past_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fault rates that add up past 1 stop `pacs-embed emulator` with a config error."""
    from pacs_embed import cli

    monkeypatch.setattr(cli.logs, "configure", lambda *args: None)  # keep the test's logging
    monkeypatch.setenv("PACS_EMBED_EMULATOR__RATE_429", "0.7")
    monkeypatch.setenv("PACS_EMBED_EMULATOR__RATE_503", "0.7")
    assert cli.main(["emulator"]) == 2
    assert "add up to more than 1" in capsys.readouterr().err
