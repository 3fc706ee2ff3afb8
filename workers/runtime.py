"""The worker process's service, bound once at start-up by ``workers.main``.

rq calls a job function by import path with only the job's arguments, so the function needs a
way to reach the objects the worker built (HTTP client with its connection pool, Redis). This
is that way — one slot per process, set before the first job and never re-bound, the same idea
as rq's own ``get_current_job()``.
"""

from __future__ import annotations

from workers.service import EmbedService

_service: EmbedService | None = None


def bind(service: EmbedService) -> None:
    global _service
    _service = service


def service() -> EmbedService:
    if _service is None:
        raise RuntimeError("no EmbedService bound: run jobs through `pacs-embed worker`")
    return _service
