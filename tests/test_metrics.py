"""Fleet-wide endpoint metrics: written by many clients into one Redis, scraped as Prometheus."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry
from structlog.testing import capture_logs

from emulator import EmulatorServer, EmulatorSettings
from pacs_embed.compose import Root
from pipeline.embed import EndpointClient, RedisLimiter
from pipeline.keys import inflight_key
from pipeline.metrics import EndpointMetrics, FleetCollector, render
from pipeline.settings import Settings
from tests.conftest import free_port
from tests.test_emulator import FaultOnce, gradient, png

METRIC_PREFIX = "pacs_embed_endpoint_"


def samples(collector: FleetCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition text, keyed by (name, sorted labels)."""
    text = render(collector).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_two_processes_add_up(redis_conn: redis.Redis) -> None:
    """Counters and histogram buckets from two recorders (two workers) are summed fleet-wide."""
    one, two = EndpointMetrics(redis_conn), EndpointMetrics(redis_conn)
    one.attempt(status="200", seconds=0.2, bytes_sent=1000, images=16)
    two.attempt(status="200", seconds=0.7, bytes_sent=500, images=8)
    two.attempt(status="429", seconds=0.01, bytes_sent=500, images=0)
    two.retry("429")
    one.retry("timeout")
    one.slot_wait(0.003)
    got = samples(FleetCollector(redis_conn))
    assert got[(f"{METRIC_PREFIX}requests_total", (("status", "200"),))] == 2
    assert got[(f"{METRIC_PREFIX}requests_total", (("status", "429"),))] == 1
    assert got[(f"{METRIC_PREFIX}retries_total", (("reason", "429"),))] == 1
    assert got[(f"{METRIC_PREFIX}retries_total", (("reason", "timeout"),))] == 1
    assert got[(f"{METRIC_PREFIX}request_bytes_total", ())] == 2000
    assert got[(f"{METRIC_PREFIX}images_total", ())] == 24
    bucket = f"{METRIC_PREFIX}request_seconds_bucket"
    assert got[(bucket, (("le", "0.05"),))] == 1  # cumulative: 0.01
    assert got[(bucket, (("le", "0.25"),))] == 2  # + 0.2
    assert got[(bucket, (("le", "1.0"),))] == 3  # + 0.7
    assert got[(bucket, (("le", "+Inf"),))] == 3
    assert got[(f"{METRIC_PREFIX}request_seconds_count", ())] == 3
    assert got[(f"{METRIC_PREFIX}request_seconds_sum", ())] == pytest.approx(0.91)
    assert got[(f"{METRIC_PREFIX}slot_wait_seconds_count", ())] == 1


def test_images_per_second_over_the_last_minute(redis_conn: redis.Redis) -> None:
    """images/s is the images of the last six full 10-second buckets over 60 s."""
    EndpointMetrics(redis_conn, clock=lambda: 1_000.0).attempt(
        status="200", seconds=0.1, bytes_sent=1, images=90
    )
    EndpointMetrics(redis_conn, clock=lambda: 1_055.0).attempt(
        status="200", seconds=0.1, bytes_sent=1, images=30
    )
    at = FleetCollector(redis_conn, clock=lambda: 1_061.0)  # buckets 100..105 are full
    assert samples(at)[(f"{METRIC_PREFIX}images_per_second", ())] == 2.0
    later = FleetCollector(redis_conn, clock=lambda: 1_065.0 + 60)
    assert samples(later)[(f"{METRIC_PREFIX}images_per_second", ())] == 0.0


def test_client_reports_attempts_retries_and_images(redis_conn: redis.Redis) -> None:
    """An EndpointClient with metrics counts each attempt by status, the retry and the images."""
    server = EmulatorServer(EmulatorSettings(), port=0)
    server.start_in_thread()
    try:
        with EndpointClient(
            server.url,
            transport=FaultOnce("503"),
            metrics=EndpointMetrics(redis_conn),
            sleep=lambda s: None,
        ) as client:
            client.embed_images([png(gradient(0.1)), png(gradient(0.9))])
    finally:
        server.shutdown()
    got = samples(FleetCollector(redis_conn))
    assert got[(f"{METRIC_PREFIX}requests_total", (("status", "503"),))] == 1
    assert got[(f"{METRIC_PREFIX}requests_total", (("status", "200"),))] == 1
    assert got[(f"{METRIC_PREFIX}retries_total", (("reason", "503"),))] == 1
    assert got[(f"{METRIC_PREFIX}images_total", ())] == 2
    assert got[(f"{METRIC_PREFIX}request_bytes_total", ())] > 0


def test_a_redis_outage_does_not_fail_the_request() -> None:
    """Metrics are best effort: with Redis down, recording logs and returns."""
    dead = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    metrics = EndpointMetrics(dead)
    with capture_logs() as logs:
        metrics.attempt(status="200", seconds=0.1, bytes_sent=10, images=1)
        metrics.retry("503")
        metrics.slot_wait(0.1)
    dead.close()
    assert [entry["event"] for entry in logs] == ["metrics.write_failed"] * 3


def test_metrics_route_needs_the_token_and_shows_in_flight(
    redis_conn: redis.Redis, tmp_path: Path
) -> None:
    """GET /metrics is Prometheus text behind the bearer token, with the leases held now."""
    url = "http://127.0.0.1:9/score"
    settings = Settings.load(
        state_dir=tmp_path,
        admin={"host": "127.0.0.1", "port": free_port(), "token": "t0ken"},
        endpoint={"url": url, "max_in_flight": 3},
    )
    lease = RedisLimiter(redis_conn, inflight_key(url), 3).acquire(1)
    EndpointMetrics(redis_conn).attempt(status="200", seconds=0.1, bytes_sent=10, images=4)
    admin = Root(settings, redis_conn).admin
    admin.start_in_thread()
    try:
        host, port = admin.address
        request = urllib.request.Request(f"http://{host}:{port}/metrics")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)  # noqa: S310 - loopback
        assert refused.value.code == 401
        refused.value.close()
        request.add_header("Authorization", "Bearer t0ken")
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            content_type = response.headers["Content-Type"]
            text = response.read().decode()
    finally:
        admin.shutdown()
        assert lease is not None
        lease.release()
    assert content_type.startswith("text/plain")
    assert f"{METRIC_PREFIX}images_total 4.0" in text
    assert f"{METRIC_PREFIX}in_flight 1.0" in text
    assert f"{METRIC_PREFIX}in_flight_limit 3.0" in text


def test_no_limit_no_in_flight_gauge(redis_conn: redis.Redis) -> None:
    """With the in-flight limit off (0) the collector does not invent a gauge for it."""
    settings = Settings.load(endpoint={"url": "http://127.0.0.1:9/score", "max_in_flight": 0})
    names = {name for name, _ in samples(Root(settings, redis_conn).fleet_metrics)}
    assert f"{METRIC_PREFIX}in_flight" not in names
    assert f"{METRIC_PREFIX}requests_total" not in names  # nothing recorded yet: no samples
