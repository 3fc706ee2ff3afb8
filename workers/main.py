"""`pacs-embed worker`: one process, one endpoint client, jobs from the embed queue.

The service (client, store, ledger, detector) is built by the process's composition root
(``pacs_embed.compose``); this module only binds it and serves the queue.
"""

from __future__ import annotations

import redis
import structlog
from rq import Queue, SimpleWorker

from pipeline.jobs import EMBED_QUEUE
from workers import runtime
from workers.service import EmbedService

log = structlog.get_logger(__name__)


def run_worker(
    connection: redis.Redis,
    service: EmbedService,
    *,
    burst: bool = False,
    endpoint: str | None = None,
) -> None:
    """Serve embed jobs with ``service`` until stopped (SIGTERM/SIGINT finish the current job);
    ``endpoint`` (its URL) is only logged.

    SimpleWorker runs jobs in this process: no fork per job (~15 ms each) and the HTTP client
    keeps its connections to the endpoint warm across jobs.
    """
    runtime.bind(service)
    worker = SimpleWorker([Queue(EMBED_QUEUE, connection=connection)], connection=connection)
    log.info("worker.started", name=worker.name, endpoint=endpoint)
    worker.work(burst=burst, with_scheduler=True, logging_level="WARNING")
