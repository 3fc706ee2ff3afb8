"""`pacs-embed worker`: one process, one endpoint client, jobs from the embed queue."""

from __future__ import annotations

import redis
import structlog
from rq import Queue, SimpleWorker

from pipeline.embed.client import EndpointClient
from pipeline.errors import ConfigError
from pipeline.jobs import EMBED_QUEUE
from pipeline.ledger import Ledger
from pipeline.settings import Settings
from pipeline.store import EmbeddingStore
from workers import runtime
from workers.service import EmbedService

log = structlog.get_logger(__name__)


def build_client(settings: Settings) -> EndpointClient:
    ep = settings.endpoint
    if not ep.url:
        raise ConfigError("endpoint.url is not set (PACS_EMBED_ENDPOINT__URL)")
    return EndpointClient(
        ep.url,
        key=settings.endpoint_key(),
        deployment=ep.deployment,
        connect_timeout=ep.connect_timeout,
        read_timeout=ep.read_timeout,
        max_attempts=ep.max_attempts,
        backoff_base=ep.backoff_base,
        backoff_max=ep.backoff_max,
    )


def run_worker(settings: Settings, connection: redis.Redis, *, burst: bool = False) -> None:
    """Serve embed jobs until stopped (SIGTERM/SIGINT finish the current job first).

    SimpleWorker runs jobs in this process: no fork per job (~15 ms each) and the HTTP client
    keeps its connections to the endpoint warm across jobs.
    """
    ledger = Ledger(connection)
    with build_client(settings) as client:
        runtime.bind(EmbedService(client, EmbeddingStore(connection, ledger), ledger))
        worker = SimpleWorker([Queue(EMBED_QUEUE, connection=connection)], connection=connection)
        log.info("worker.started", name=worker.name, endpoint=settings.endpoint.url)
        worker.work(burst=burst, with_scheduler=True, logging_level="WARNING")
