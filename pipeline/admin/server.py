"""`pacs-embed admin`: serves the route table of ``pipeline.admin.routes`` over HTTP.

It declares no route of its own: a path not in the table is 404, a route marked ``token`` without
the right bearer token is 401, a handler that raises is 503 (logged, its message withheld).
"""

from __future__ import annotations

import hmac
import json
import threading
import urllib.parse
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from pipeline.admin.routes import Body, Route, Text

log = structlog.get_logger(__name__)


class AdminServer:
    """A small threaded HTTP server answering ``routes`` (path -> route), and nothing else."""

    def __init__(self, host: str, port: int, token: str, routes: Mapping[str, Route]) -> None:
        self.token = token
        self.routes = routes
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def _authorised(self, header: str | None) -> bool:
        expected = f"Bearer {self.token}".encode()
        return header is not None and hmac.compare_digest(header.encode(), expected)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                route = server.routes.get(path)
                if route is None:
                    self._send(404, {"error": "not found"})
                elif route.token and not server._authorised(self.headers.get("Authorization")):
                    self._send(401, {"error": "bearer token required"})
                else:
                    try:
                        self._send(*route.handler(dict(urllib.parse.parse_qsl(query))))
                    except Exception as exc:
                        log.exception("admin.error", path=path)
                        self._send(503, {"error": type(exc).__name__})

            def _send(self, status: int, body: Body) -> None:
                if isinstance(body, Text):
                    data, content_type = body.body, body.content_type
                else:
                    data, content_type = json.dumps(body, default=str).encode(), "application/json"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # access logs would be noise; errors are logged above

        return Handler

    def start_in_thread(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="admin", daemon=True)
        self._thread.start()
        log.info("admin.started", host=self.address[0], port=self.address[1])

    def serve_forever(self) -> None:
        log.info("admin.started", host=self.address[0], port=self.address[1])
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
