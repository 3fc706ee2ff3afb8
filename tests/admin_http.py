"""GET from an AdminServer on loopback, the way a monitoring probe would."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from http.client import HTTPResponse
from typing import Any

from pipeline.admin.server import AdminServer


def get(server: AdminServer, path: str, token: str | None = None) -> tuple[int, Any]:
    """(HTTP status, decoded JSON body, or the text of another content type such as /metrics');
    error statuses are returned, not raised."""
    host, port = server.address
    request = urllib.request.Request(f"http://{host}:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return response.status, _body(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _body(exc)


def _body(response: HTTPResponse | urllib.error.HTTPError) -> Any:
    if response.headers.get_content_type() == "application/json":
        return json.load(response)
    return response.read().decode()
