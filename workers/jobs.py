"""rq job functions, the worker side of ``pipeline.jobs`` (enqueued by import path)."""

from __future__ import annotations

from typing import Any

import structlog
from rq import get_current_job

from pipeline.errors import PermanentPushError, TransientEndpointError, TransientPushError
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
            service.give_up(batch, f"endpoint: {exc}")
            return {"embedded": 0, "already": 0, "failed": len(batch.items)}
        log.info("embed.done", **outcome.as_dict())
        return outcome.as_dict()


def push_version(sink: str, study: str, version: int, force: bool = False) -> str:
    """Push one study version to one sink. A transient refusal is raised for rq to retry until
    the last try; then, or at once for a permanent refusal, the push is dead-lettered."""
    service = runtime.pusher()
    with structlog.contextvars.bound_contextvars(
        sink=sink, study_instance_uid=study, version=version
    ):
        try:
            return service.push(sink, study, version, force=force).value
        except PermanentPushError as exc:
            reason = str(exc)
        except TransientPushError as exc:
            job = get_current_job()
            if job is not None and job.retries_left:
                log.warning("push.retry_later", reason=str(exc), retries_left=job.retries_left)
                raise
            reason = f"{exc} (every retry failed)"
        except Exception as exc:  # a bug building the objects: retried, then kept for an operator
            job = get_current_job()
            if job is not None and job.retries_left:
                raise
            log.exception("push.crashed")
            reason = f"could not build the results ({type(exc).__name__})"
        job = get_current_job()
        service.dead_letter(job.id if job is not None else "", sink, study, version, reason)
        return "dead_lettered"
