"""The composition root: the objects a pacs-embed process uses, built once from its settings.

Each command is handed one :class:`Root`. A root builds an object the first time it is asked for
and keeps it, so one process has one Redis connection, one ledger, one store, one client:

    settings -> redis -> ledger, intake log -> embeddings store, reference sets, cohort rule
             -> in-flight limiter -> endpoint client -> detector -> embed service (a worker)
             -> listener, dispatch host; admin server (the route table over the same
             objects); emulator

Nothing is built before a command asks for it, and the modules behind the heavy objects
(pynetdicom, rq, the detector, the HTTP client) are imported by the property that builds them,
so `pacs-embed convert` and `status` start fast. A root closes what it opened (the endpoint
client's connection pool) when its ``with`` block ends.

`pacs-embed run` records what it started as settings overrides, loaded by this process and
handed to its children as env vars (:func:`child_env`). :func:`local_emulator` is the one place
that knows the local emulator's address, and it turns ``detect.label_check`` off explicitly
when `run` starts the emulator (no process guesses it from the endpoint's URL).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from pacs_embed.secrets import ensure_secret_file
from pipeline.errors import ConfigError
from pipeline.intake import IntakeLog
from pipeline.keys import inflight_key
from pipeline.ledger import Ledger
from pipeline.settings import Settings

if TYPE_CHECKING:
    from dicom_listener.dispatch_host import DispatchHost
    from dicom_listener.retention import Retention
    from dicom_listener.server import Listener
    from dicom_listener.spool import Spool
    from emulator.server import EmulatorServer
    from pipeline.admin.probe import EndpointProbe
    from pipeline.admin.routes import AdminState
    from pipeline.admin.server import AdminServer
    from pipeline.deadletters import DeadLetters
    from pipeline.detect.cohort import CohortRule
    from pipeline.detect.detector import Detector
    from pipeline.detect.reference import ReferenceStore
    from pipeline.embed.client import EndpointClient
    from pipeline.embed.limiter import RedisLimiter
    from pipeline.metrics import FleetCollector
    from pipeline.store import EmbeddingStore
    from pipeline.studies import Studies
    from workers.push import PushService
    from workers.service import EmbedService

#: What a process is told on top of its file and environment, as ``Settings.load`` takes it:
#: ``{"state_dir": path, "redis": {"url": ...}, ...}``.
Overrides = Mapping[str, Any]


class Root:
    """One process's objects, each built from ``settings`` on first use and then kept.

    ``connection``: a Redis connection to use instead of connecting (tests, a second root that
    shares the first one's Redis).
    """

    def __init__(self, settings: Settings, connection: redis.Redis | None = None) -> None:
        self.settings = settings
        self._connection = connection
        self._closing = contextlib.ExitStack()

    def __enter__(self) -> Root:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._closing.close()

    # -- state in Redis ------------------------------------------------------------------------

    @cached_property
    def redis(self) -> redis.Redis:
        """The given connection, else one of our own, closed (its sockets too) with the root."""
        if self._connection is not None:
            return self._connection
        connection = connect(self.settings)
        self._closing.callback(connection.close)
        return connection

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.redis)

    @cached_property
    def intake(self) -> IntakeLog:
        return IntakeLog(self.redis)

    @cached_property
    def store(self) -> EmbeddingStore:
        from pipeline.store import EmbeddingStore

        return EmbeddingStore(self.redis, self.ledger)

    @cached_property
    def references(self) -> ReferenceStore:
        from pipeline.detect.detector import reference_store

        return reference_store(self.settings.detect, self.redis)

    @cached_property
    def cohort_rule(self) -> CohortRule:
        from pipeline.detect.detector import cohort_rule

        return cohort_rule(self.settings.detect)

    def status(self) -> dict[str, Any]:
        """The /status document."""
        from pipeline.admin import status

        s = self.settings
        return status.gather(self.redis, self.ledger, self.intake, s.spool_dir, s.quarantine_dir)

    # -- the endpoint and the embed worker -----------------------------------------------------

    @cached_property
    def limiter(self) -> RedisLimiter | None:
        """The fleet-wide in-flight cap on endpoint requests; None when there is none."""
        return in_flight_limiter(self.settings, self.redis)

    @cached_property
    def client(self) -> EndpointClient:
        client = build_client(self.settings, self.redis, limiter=self.limiter)
        return self._closing.enter_context(client)

    @cached_property
    def detector(self) -> Detector | None:
        from pipeline.detect.detector import build_detector

        return build_detector(self.settings, self.redis, self.client)

    @cached_property
    def embed_service(self) -> EmbedService:
        from pipeline.stage_metrics import StageMetrics
        from workers.service import EmbedService

        return EmbedService(
            self.client, self.store, self.ledger, self.detector, metrics=StageMetrics(self.redis)
        )

    def work(self, *, burst: bool = False) -> None:
        """Serve embed jobs in this process until stopped (``workers.main``)."""
        from workers.main import run_worker

        run_worker(
            self.redis,
            self.embed_service,
            burst=burst,
            endpoint=self.settings.endpoint.url,
            concurrency=self.settings.workers.concurrency,
        )

    # -- study versions and the push service (on the listener host) ----------------------------

    @cached_property
    def studies(self) -> Studies:
        from pipeline.studies import Studies

        return Studies(self.redis, self.settings.study)

    @cached_property
    def dead_letters(self) -> DeadLetters:
        from pipeline.deadletters import DeadLetters

        return DeadLetters(self.redis)

    @cached_property
    def spool(self) -> Spool:
        from dicom_listener.spool import Spool

        return Spool(self.settings.spool_dir, self.settings.quarantine_dir)

    @cached_property
    def retention(self) -> Retention:
        from dicom_listener.retention import Retention

        sp = self.settings.spool
        return Retention(
            self.spool,
            self.redis,
            hours=sp.retention_hours,
            low_free_bytes=sp.cleanup_free_disk_mb * 1024 * 1024,
            node=self.node,
        )

    @cached_property
    def node(self) -> str:
        """This state dir's listener node (its listener, push service and retention)."""
        return node_name(self.settings.state_dir)

    @property
    def sinks(self) -> list[str]:
        """The configured sinks' names, without building them."""
        from workers.push import DICOM, DICOMWEB, WEBHOOK

        sk = self.settings.sinks
        named = {DICOM: sk.dicom.host, DICOMWEB: sk.dicomweb.url, WEBHOOK: sk.webhook.url}
        return [name for name, address in named.items() if address]

    @cached_property
    def push_service(self) -> PushService:
        import httpx

        from pipeline.results import Algorithm
        from pipeline.sinks.dicom import DicomSink
        from pipeline.sinks.dicomweb import DicomWebSink
        from pipeline.sinks.webhook import WebhookSink
        from pipeline.stage_metrics import StageMetrics
        from workers.push import DICOM, DICOMWEB, WEBHOOK, DatasetSink, PushService

        s, configured = self.settings, self.sinks
        sinks: dict[str, DatasetSink] = {}
        if DICOM in configured:
            sinks[DICOM] = DicomSink(s.sinks.dicom)
        if DICOMWEB in configured:
            sinks[DICOMWEB] = DicomWebSink.from_settings(
                s.sinks.dicomweb, token=s.dicomweb_token(), password=s.dicomweb_password()
            )
        webhook = None
        if WEBHOOK in configured:
            client = self._closing.enter_context(httpx.Client(follow_redirects=False))
            webhook = WebhookSink.from_settings(s.sinks.webhook, s.webhook_secret() or "", client)
        return PushService(
            connection=self.redis,
            studies=self.studies,
            dead_letters=self.dead_letters,
            ledger=self.ledger,
            store=self.store,
            read_header=self.spool.header,
            datasets=sinks,
            webhook=webhook,
            algorithm=Algorithm(
                model_version=s.endpoint.deployment or "unspecified",
                software_version=software_version(),
            ),
            include_vectors=s.sinks.webhook.include_vectors,
            delivered=self._delivered,
            metrics=StageMetrics(self.redis),
        )

    def _delivered(self, study: str, version: int) -> None:
        """A study version reached every sink (or completed, with none): its instances' files
        may go — unless a newer version opened since, whose instances are still needed."""
        if self.studies.current_version(study) == version:
            self.retention.eligible(self.studies.members(study))

    def push(self) -> None:
        """Serve push jobs and complete study versions in this process (``workers.main``)."""
        from rq import Queue

        from pipeline.jobs import push_queue
        from workers.completer import Completer
        from workers.main import run_pusher

        service = self.push_service
        studies = self.studies

        def queue_of(study: str) -> Queue:
            return Queue(push_queue(studies.node_of(study)), connection=self.redis)

        mine = push_queue(self.node)
        completer = Completer(
            studies,
            Queue(mine, connection=self.redis),
            service.sinks,
            final=self._delivered,
            housekeeping=self.retention.clean,
            metrics=service.metrics,
            queue_of=queue_of,
        )
        run_pusher(self.redis, service, completer, mine)

    # -- servers -------------------------------------------------------------------------------

    @cached_property
    def listener(self) -> Listener:
        from dicom_listener.server import Listener

        return Listener(self.settings, self.redis, self.node)

    @cached_property
    def dispatch_host(self) -> DispatchHost:
        from dicom_listener.dispatch_host import DispatchHost

        return DispatchHost(self.settings, self.redis, self.node)

    @cached_property
    def fleet_metrics(self) -> FleetCollector:
        """The workers' fleet-wide endpoint metrics, plus the in-flight leases they hold now."""
        from pipeline.metrics import FleetCollector

        limiter = self.limiter
        if limiter is None:
            return FleetCollector(self.redis)
        return FleetCollector(
            self.redis, in_flight=limiter.in_flight, in_flight_limit=limiter.limit
        )

    @cached_property
    def admin_state(self) -> AdminState:
        from pipeline.admin.routes import AdminState
        from pipeline.metrics import IntakeCollector
        from pipeline.stage_metrics import StageCollector

        s = self.settings
        return AdminState(
            connection=self.redis,
            ledger=self.ledger,
            intake=self.intake,
            store=self.store,
            cohort_rule=self.cohort_rule,
            spool_dir=s.spool_dir,
            quarantine_dir=s.quarantine_dir,
            collectors=(
                self.fleet_metrics,
                IntakeCollector(self.redis),
                StageCollector(self.redis, s.spool_dir),
            ),
            sinks=self.sinks,
            min_free_bytes=s.listener.min_free_disk_mb * 1024 * 1024,
            endpoint_probe=endpoint_probe(s),
        )

    @cached_property
    def admin_token(self) -> str:
        """The configured token, else one generated once under the state dir (0600)."""
        s = self.settings
        return s.admin_token() or ensure_secret_file(s.secrets_dir / "admin.token")

    @cached_property
    def admin(self) -> AdminServer:
        from pipeline.admin import routes
        from pipeline.admin.server import AdminServer

        a = self.settings.admin
        return AdminServer(a.host, a.port, self.admin_token, routes.table(self.admin_state))

    @cached_property
    def emulator(self) -> EmulatorServer:
        from emulator import server

        return server.EmulatorServer(self.settings.emulator)


def node_name(state_dir: Path) -> str:
    """The listener node a state dir is: a random name kept in its ``node`` file, made once.
    A listener, its dispatcher and its push service share the state dir (the spool), so they
    share the name; another host's state dir is another node, whatever its path."""
    path = state_dir / "node"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / f".node.{os.getpid()}"
        tmp.write_text(secrets.token_hex(6) + "\n")
        try:
            os.link(tmp, path)  # the first one made wins; the others read it
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def software_version() -> str:
    """pacs-embed's version, as installed (SR equipment module, webhook bodies)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pacs-embed")
    except PackageNotFoundError:
        return "unknown"


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
    # Fail fast while Redis is away (restarting, say): every caller backs off on its own and
    # /readyz must answer 503 at once, not after redis-py's default retries (about 4 s).
    return redis.Redis.from_url(url, socket_connect_timeout=2, retry=_FAIL_FAST)


#: Two quick retries (50, then 100 ms): enough for a dropped connection, short for an outage.
_FAIL_FAST = Retry(ExponentialBackoff(cap=0.25, base=0.05), 2)


def in_flight_limiter(settings: Settings, connection: redis.Redis) -> RedisLimiter | None:
    """The fleet-wide in-flight cap the endpoint settings describe; None when the limit is 0."""
    from pipeline.embed.limiter import RedisLimiter

    ep = settings.endpoint
    if not (ep.url and ep.in_flight_limit):
        return None
    return RedisLimiter(
        connection,
        inflight_key(ep.url, ep.deployment),
        ep.in_flight_limit,
        lease_seconds=ep.lease_seconds,
    )


def check_endpoint_auth(auth: str, *, has_key: bool) -> None:
    """The endpoint's auth against whether a key is given: a key with auth 'key', else none."""
    if auth == "key" and not has_key:
        raise ConfigError(
            "endpoint.auth is 'key' but no key is set: PACS_EMBED_ENDPOINT__KEY or "
            "endpoint.key_file (or endpoint.auth = 'entra', or 'none' for a keyless emulator)"
        )
    if auth != "key" and has_key:
        raise ConfigError(f"endpoint.auth is {auth!r} but an endpoint key is set as well")


def build_client(
    settings: Settings,
    connection: redis.Redis | None = None,
    *,
    limiter: RedisLimiter | None = None,
) -> EndpointClient:
    """The endpoint client the settings describe (a context manager: it owns an HTTP pool).

    With a Redis ``connection`` it reports fleet metrics and takes a fleet-wide in-flight slot
    per attempt (``limiter``, else the one the settings describe; none when the limit is 0).
    """
    from pipeline.embed.auth import entra_credential
    from pipeline.embed.client import EndpointClient
    from pipeline.metrics import EndpointMetrics

    ep = settings.endpoint
    if not ep.url:
        raise ConfigError("endpoint.url is not set (PACS_EMBED_ENDPOINT__URL)")
    key = settings.endpoint_key()
    credential = None
    check_endpoint_auth(ep.auth, has_key=key is not None)
    if ep.auth == "entra":
        credential = entra_credential(ep.managed_identity_client_id)
    metrics = None
    if connection is not None:
        metrics = EndpointMetrics(connection)
        if limiter is None:
            limiter = in_flight_limiter(settings, connection)
    return EndpointClient(ep, key=key, credential=credential, limiter=limiter, metrics=metrics)


# -- what `pacs-embed run` starts --------------------------------------------------------------


def emulator_base_url(settings: Settings) -> str:
    emu = settings.emulator
    return f"http://{emu.host}:{emu.port}"


def endpoint_probe(settings: Settings) -> EndpointProbe | None:
    """/readyz's endpoint check: the local emulator's /healthz when the endpoint is the one
    :func:`local_emulator` names, else a HEAD of the scoring URI; None without an endpoint."""
    from pipeline.admin.probe import EndpointProbe

    url = settings.endpoint.url
    if not url:
        return None
    base = emulator_base_url(settings)
    if url == f"{base}/score":
        return EndpointProbe.local_emulator(base)
    return EndpointProbe.scoring_uri(url)


def local_emulator(settings: Settings) -> dict[str, dict[str, Any]]:
    """What every process is told when `run` starts the local emulator (``endpoint.url`` unset):
    the endpoint is the emulator, read with the emulator's key file (which `run` generates when
    no emulator key is set), and ``detect.label_check`` is off — the emulator embeds text and
    images in unrelated spaces, so every image would be a label "mismatch" (its outlier flags
    still mean something: similar pictures, similar vectors)."""
    key_file = settings.emulator.key_file or settings.secrets_dir / "endpoint.key"
    overrides: dict[str, dict[str, Any]] = {
        "endpoint": {"url": f"{emulator_base_url(settings)}/score", "key_file": key_file},
        "detect": {"label_check": False},
    }
    if settings.emulator_key() is None:
        overrides["emulator"] = {"key_file": key_file}
    return overrides


def with_local_endpoint(settings: Settings) -> Settings:
    """No endpoint configured: the emulator of a `pacs-embed run` on this state dir, as its
    workers use it (for a one-shot command such as `search --file`)."""
    if settings.endpoint.url:
        return settings
    endpoint = settings.endpoint.model_copy(update=local_emulator(settings)["endpoint"])
    return settings.model_copy(update={"endpoint": endpoint})


def child_env(overrides: Overrides) -> dict[str, str]:
    """``overrides`` as the ``PACS_EMBED_*`` variables that make a child's ``Settings.load``
    see them: ``{"redis": {"url": u}}`` -> ``PACS_EMBED_REDIS__URL=u``."""
    env: dict[str, str] = {}
    for name, value in overrides.items():
        if isinstance(value, Mapping):
            for key, item in value.items():
                env[f"PACS_EMBED_{name.upper()}__{key.upper()}"] = _env_text(item)
        else:
            env[f"PACS_EMBED_{name.upper()}"] = _env_text(value)
    return env


def _env_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
