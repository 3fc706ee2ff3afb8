"""The admin endpoint as an ASGI application (Starlette): the route table of ``routes``, behind the
bearer token where a route asks for it, and JSON for every answer that is not a route's own.

Every error is ``{"error": "<what>"}``, Content-Type application/json, and says no more than the
status: the HTTP reason phrase for what the request got wrong (a 401 does not tell a missing token
from a wrong one; 404, 405 with ``Allow``, 414, 431), the exception's class name for a handler that
raised (503; the traceback goes to the log, never to the client).

The token is checked before the method: without it any method on a route is 401, so a caller
without the token learns nothing, not even which methods a path takes; with it, a method the route
does not take is 405 with ``Allow``. A request body (POST /requeue) is read up to
``Limits.max_body_bytes``; past that, 413.

Handlers block (Redis, the spool's disk), so each runs on a worker thread, at most
``Limits.max_handlers`` at once.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

import anyio
import anyio.to_thread
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute
from starlette.routing import request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.admin.api import Body, Call, Text
from pipeline.admin.limits import Limits
from pipeline.admin.routes import Route

log = structlog.get_logger(__name__)

JSON = "application/json"


def build(routes: Mapping[str, Route], token: str, limits: Limits) -> Starlette:
    """The ASGI app answering ``routes`` (path -> route) and nothing else."""
    slots = anyio.CapacityLimiter(limits.max_handlers)
    expected = f"Bearer {token}".encode()
    app = Starlette(
        routes=[
            StarletteRoute(
                path, _AnyMethod(_endpoint(route, expected, slots, limits.max_body_bytes))
            )
            for path, route in routes.items()
        ],
        middleware=[Middleware(HeadLimits, limits=limits)],
        exception_handlers={HTTPException: _http_error, Exception: _unexpected},
    )
    app.router.redirect_slashes = False  # "/healthz/" is not a route: 404, not a redirect
    return app


def error_body(status: int) -> bytes:
    """The JSON of an error answer: the status's reason phrase, nothing about the cause."""
    return json.dumps({"error": HTTPStatus(status).phrase}).encode()


def error(status: int, headers: Mapping[str, str] | None = None) -> Response:
    return Response(error_body(status), status, headers, media_type=JSON)


def render(status: int, body: Body) -> Response:
    """A handler's (status, body) as the HTTP answer."""
    if isinstance(body, Text):
        return Response(body.body, status, dict(body.headers), media_type=body.content_type)
    return Response(json.dumps(body, default=str).encode(), status, media_type=JSON)


def _endpoint(
    route: Route, expected: bytes, slots: anyio.CapacityLimiter, max_body: int
) -> Callable[[Request], Awaitable[Response]]:
    allowed = {*route.methods, *(("HEAD",) if "GET" in route.methods else ())}
    allow = ", ".join(sorted(allowed))

    async def endpoint(request: Request) -> Response:
        if route.token and not _authorised(request.headers.get("authorization"), expected):
            return error(HTTPStatus.UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        if request.method not in allowed:
            return error(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": allow})
        body = await _body(request, max_body)
        if body is None:
            return error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        call = Call(
            query=dict(request.query_params),  # the last value of each name
            path={name: str(value) for name, value in request.path_params.items()},
            body=body,
        )
        try:
            status, answer = await anyio.to_thread.run_sync(route.handler, call, limiter=slots)
        except Exception as exc:
            log.exception("admin.error", path=request.scope["path"])
            return render(HTTPStatus.SERVICE_UNAVAILABLE, {"error": type(exc).__name__})
        return render(status, answer)

    return endpoint


async def _body(request: Request, limit: int) -> bytes | None:
    """The request body, or None once it grows past ``limit`` bytes (not read further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _authorised(header: str | None, expected: bytes) -> bool:
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes that came.
    return header is not None and hmac.compare_digest(header.encode("latin-1"), expected)


def _http_error(_request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (404, 405), which it would answer in text/plain."""
    if isinstance(exc, HTTPException):
        return error(exc.status_code, exc.headers)
    return error(HTTPStatus.BAD_REQUEST)


def _unexpected(request: Request, exc: Exception) -> Response:
    """A failure outside any handler (a bug here): the same 503 a handler's failure gets."""
    log.error("admin.error", path=request.scope["path"], error=type(exc).__name__)
    return render(HTTPStatus.SERVICE_UNAVAILABLE, {"error": type(exc).__name__})


class _AnyMethod:
    """An endpoint as an ASGI app, so that Starlette hands it every method (given a function it
    would answer anything but GET with its own 405, before the token is checked)."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.app = request_response(endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class HeadLimits:
    """414 / 431 for a request whose head came in one read, too long: h11 parses a head that
    arrives whole whatever its size (``protocol`` refuses one that arrives in pieces)."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            target = len(scope["raw_path"]) + 1 + len(scope["query_string"])
            head = target + sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if target > self.limits.max_url_bytes:
                await error(HTTPStatus.REQUEST_URI_TOO_LONG)(scope, receive, send)
                return
            if head > self.limits.max_head_bytes:
                await error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)(scope, receive, send)
                return
        await self.app(scope, receive, send)
