"""`pacs-embed worker`: one process, one endpoint client, jobs from the embed queue."""

from __future__ import annotations

import redis
import structlog
from rq import Queue, SimpleWorker

from pipeline.detect.detector import build_detector
from pipeline.embed.auth import entra_credential
from pipeline.embed.client import EndpointClient
from pipeline.embed.limiter import RedisLimiter
from pipeline.errors import ConfigError
from pipeline.jobs import EMBED_QUEUE
from pipeline.keys import inflight_key
from pipeline.ledger import Ledger
from pipeline.metrics import EndpointMetrics
from pipeline.settings import Settings
from pipeline.store import EmbeddingStore
from workers import runtime
from workers.service import EmbedService

log = structlog.get_logger(__name__)


def build_client(settings: Settings, connection: redis.Redis | None = None) -> EndpointClient:
    """The endpoint client the settings describe. With a Redis ``connection`` it also takes a
    fleet-wide in-flight slot per attempt (unless the limit is 0) and reports fleet metrics."""
    ep = settings.endpoint
    if not ep.url:
        raise ConfigError("endpoint.url is not set (PACS_EMBED_ENDPOINT__URL)")
    key = settings.endpoint_key()
    credential = None
    if ep.auth == "key" and key is None:
        raise ConfigError(
            "endpoint.auth is 'key' but no key is set: PACS_EMBED_ENDPOINT__KEY or "
            "endpoint.key_file (or endpoint.auth = 'entra', or 'none' for a keyless emulator)"
        )
    if ep.auth != "key" and key is not None:
        raise ConfigError(f"endpoint.auth is {ep.auth!r} but an endpoint key is set as well")
    if ep.auth == "entra":
        credential = entra_credential(ep.managed_identity_client_id)
    limiter = metrics = None
    if connection is not None:
        metrics = EndpointMetrics(connection)
        if ep.in_flight_limit:
            limiter = RedisLimiter(
                connection,
                inflight_key(ep.url, ep.deployment),
                ep.in_flight_limit,
                lease_seconds=ep.lease_seconds,
            )
    return EndpointClient(ep, key=key, credential=credential, limiter=limiter, metrics=metrics)


def run_worker(settings: Settings, connection: redis.Redis, *, burst: bool = False) -> None:
    """Serve embed jobs until stopped (SIGTERM/SIGINT finish the current job first).

    SimpleWorker runs jobs in this process: no fork per job (~15 ms each) and the HTTP client
    keeps its connections to the endpoint warm across jobs.
    """
    ledger = Ledger(connection)
    with build_client(settings, connection) as client:
        detector = build_detector(settings, connection, client)
        runtime.bind(EmbedService(client, EmbeddingStore(connection, ledger), ledger, detector))
        worker = SimpleWorker([Queue(EMBED_QUEUE, connection=connection)], connection=connection)
        log.info("worker.started", name=worker.name, endpoint=settings.endpoint.url)
        worker.work(burst=burst, with_scheduler=True, logging_level="WARNING")
