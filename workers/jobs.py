"""rq job functions, the worker side of ``pipeline.jobs`` (enqueued by import path)."""

from __future__ import annotations

from typing import Any

import structlog
from rq import get_current_job

from pipeline.errors import TransientEndpointError
from pipeline.jobs import EmbedBatch
from workers import runtime

log = structlog.get_logger(__name__)


def embed_batch(payload: dict[str, Any]) -> dict[str, int]:
    """Embed one batch. A transient failure is raised for rq to retry, until the last try."""
    batch = EmbedBatch.from_payload(payload)
    service = runtime.service()
    with structlog.contextvars.bound_contextvars(
        series_instance_uid=batch.series_instance_uid, images=len(batch.items)
    ):
        try:
            outcome = service.run(batch)
        except TransientEndpointError as exc:
            job = get_current_job()
            if job is not None and job.retries_left:
                log.warning("embed.retry_later", reason=str(exc), retries_left=job.retries_left)
                raise
            service.give_up(batch, exc)
            return {"embedded": 0, "already": 0, "failed": len(batch.items)}
        log.info("embed.done", **outcome.as_dict())
        return outcome.as_dict()
