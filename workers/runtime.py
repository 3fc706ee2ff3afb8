"""The worker process's service (embed or push), bound once at start-up by ``workers.main``.

rq calls a job function by import path with only the job's arguments, so the function needs a
way to reach the objects the worker built (HTTP client with its connection pool, Redis). This
is that way — one slot per process, set before the first job and never re-bound, the same idea
as rq's own ``get_current_job()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.push import PushService
    from workers.service import EmbedService

_service: EmbedService | None = None
_pusher: PushService | None = None


def bind(service: EmbedService) -> None:
    global _service
    _service = service


def service() -> EmbedService:
    if _service is None:
        raise RuntimeError("no EmbedService bound: run jobs through `pacs-embed worker`")
    return _service


def bind_pusher(service: PushService) -> None:
    global _pusher
    _pusher = service


def pusher() -> PushService:
    if _pusher is None:
        raise RuntimeError("no PushService bound: run push jobs through `pacs-embed push`")
    return _pusher
