"""Builders shared by the subcommands: each takes the settings and returns a ready object."""

from __future__ import annotations

import redis

from pacs_embed import verdict_commands
from pacs_embed.secrets import ensure_secret_file
from pipeline import metrics
from pipeline.admin import status
from pipeline.admin.server import AdminServer, Text
from pipeline.embed.limiter import RedisLimiter
from pipeline.errors import ConfigError
from pipeline.keys import inflight_key
from pipeline.settings import Settings


def connect(settings: Settings) -> redis.Redis:
    """The configured Redis, else the private one a running `pacs-embed run` announced."""
    url = settings.redis.url
    announced = settings.state_dir / "redis" / "url"
    if not url and announced.exists():
        url = announced.read_text().strip()
    if not url:
        raise ConfigError(
            "redis.url is not set (PACS_EMBED_REDIS__URL) and no `pacs-embed run` is running "
            f"on state dir {settings.state_dir}"
        )
    return redis.Redis.from_url(url)


def admin_token(settings: Settings) -> str:
    """The configured token, else one generated once under the state dir (0600)."""
    return settings.admin_token() or ensure_secret_file(settings.secrets_dir / "admin.token")


def admin_server(settings: Settings, connection: redis.Redis) -> AdminServer:
    spool, quarantine = settings.spool_dir, settings.quarantine_dir

    def status_route(_query: dict[str, str]) -> tuple[int, dict[str, object]]:
        return 200, status.gather(connection, spool, quarantine)

    def ready_route(_query: dict[str, str]) -> tuple[int, dict[str, object]]:
        checks = status.ready(connection, spool)
        return (200 if all(checks.values()) else 503), dict(checks)

    fleet = metrics_collector(settings, connection)
    intake = metrics.IntakeCollector(connection)

    def metrics_route(_query: dict[str, str]) -> tuple[int, Text]:
        return 200, Text(metrics.render(fleet, intake), metrics.CONTENT_TYPE)

    return AdminServer(
        settings.admin.host,
        settings.admin.port,
        admin_token(settings),
        {
            "/status": status_route,
            "/readyz": ready_route,
            "/metrics": metrics_route,
            **verdict_commands.admin_routes(settings, connection),  # /search, /verdicts
        },
    )


def metrics_collector(settings: Settings, connection: redis.Redis) -> metrics.FleetCollector:
    """The workers' fleet-wide endpoint metrics, plus the in-flight leases they hold now."""
    ep = settings.endpoint
    limit = ep.in_flight_limit
    if not (ep.url and limit):
        return metrics.FleetCollector(connection)
    limiter = RedisLimiter(connection, inflight_key(ep.url, ep.deployment), limit)
    return metrics.FleetCollector(connection, in_flight=limiter.in_flight, in_flight_limit=limit)
