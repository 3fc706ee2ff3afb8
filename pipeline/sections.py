"""Every settings section, each declared once: its keys, their defaults and their rules.

A section is also the value the code that uses it is handed, as is or through a subclass that
adds what only exists at run time — never as a copy of its fields:

    ConvertSettings   [convert]; ``pipeline.convert.ConvertOptions`` is it plus the body part
                      aliases, what the conversion pool receives. ``ModalityRule``, a
                      [convert.modality.<MODALITY>] section, is derived from ``ModalityChoices``.
    QueueSettings     [queue]; ``dicom_listener.dispatcher.DispatchLimits`` adds ``in_flight``.
    EndpointSettings  [endpoint], passed whole to ``pipeline.embed.EndpointClient``.
    EmulatorSettings  [emulator], passed whole to ``emulator.EmulatorServer``; it is a
                      ``FaultPlan``, the faults part on its own.

So a new setting is one field here (plus its line in config/default.toml and the README table,
kept equal to the defaults by tests/test_settings.py). ``pipeline.settings.Settings`` composes the
sections and reads them from the TOML file and the environment. This module imports pydantic
(and from pydantic-settings only its ``NoDecode`` marker), never ``pipeline.settings``, so the
conversion processes can unpickle their options without building settings.

A section built directly (a test, the listener deriving its limits) refuses a bad value with a
:class:`ConfigError` naming the key (``convert.size: ...``), as ``Settings.load`` does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode

from pipeline.errors import ConfigError
from pipeline.vocabulary import DEFAULT_EMBED_MODALITIES, DEFAULT_SKIP_SOP_CLASSES

Port = Annotated[int, Field(ge=1, le=65535)]


class Section(BaseModel):
    """One concept's settings: frozen, no unknown keys, checked when built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Where its keys live, for messages: "convert" names ``convert.size``.
    section: ClassVar[str] = ""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError("; ".join(error_lines(exc, self.section))) from exc

    # Only a direct call: nested in Settings (or in another section), pydantic validates without
    # calling __init__, so Settings.load reports every error with its full key.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        # Frozen values, so hashable (e.g. as a cache key) even with dict and list fields.
        return hash((type(self), _hashable(dict(self))))


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((key, _hashable(item)) for key, item in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_hashable(item) for item in value)
    return value


def error_lines(exc: ValidationError, prefix: str = "") -> list[str]:
    """One ``<section>.<key>: <message>`` line per error of ``exc``."""
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        lines.append(f"{name}: {error['msg']}" if name else str(error["msg"]))
    return lines


def overrides_of(group: type[Section]) -> type[Section]:
    """A section base with ``group``'s keys, each optional (None: keep the group's value) and
    held to the same rules: the keys are declared once, in ``group``."""
    fields: dict[str, Any] = {}
    for name, info in group.model_fields.items():
        kind: Any = info.annotation
        if info.metadata:  # constraints such as ge=0, kept on the value when it is set
            kind = Annotated[(kind, *info.metadata)]
        fields[name] = (kind | None, None)
    return create_model(f"{group.__name__}Overrides", __base__=Section, **fields)


def _ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16 or "\\" in value or not value.isascii() or not value.strip():
        raise ValueError("an AE title is 1-16 ASCII characters, not all spaces, no backslash")
    return value


def _ae_title_list(value: Any) -> Any:
    """``PACS1,PACS2`` (the env form) or a JSON list as text; a TOML list passes as it is."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        return json.loads(value)  # a JSONDecodeError is a ValueError: reported with the key
    return [title.strip() for title in value.split(",") if title.strip()]


#: A list of AE titles, also read from one string (NoDecode: pydantic-settings leaves an env
#: value as text, so ``_ae_title_list`` reads both ``PACS1,PACS2`` and ``["PACS1","PACS2"]``).
AETitles = Annotated[
    list[Annotated[str, AfterValidator(_ae_title)]], NoDecode, BeforeValidator(_ae_title_list)
]


class ListenerSettings(Section):
    """The DICOM Storage SCP, on ``port`` and, with TLS, also on ``tls_port`` (same AE, same
    handlers). Connections are counted per peer address from accept to close; association slots
    (``max_associations``) only from an accepted request to the end of its association, so
    connections that never send one cannot take them and are closed after
    ``association_request_timeout_seconds`` (docs/architecture.md §4)."""

    section = "listener"

    host: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens for its PACS; restrict with allowed_*
    port: Port = 11112
    ae_title: Annotated[str, AfterValidator(_ae_title)] = "PACS_EMBED"
    allowed_calling_aets: AETitles = Field(default_factory=list)  # empty: any calling AE
    require_called_aet: bool = True  # associations addressed to another AE title are rejected
    accept_unknown_sop_classes: bool = False  # private/unknown storage classes (like Orthanc's)
    max_associations: int = Field(default=16, ge=1)  # established associations, both ports
    # open connections per address; above max_associations, so a sender using every slot is
    # still answered A-ASSOCIATE-RJ (local limit exceeded) rather than a closed connection
    max_connections_per_peer: int = Field(default=32, ge=1)
    # bounds the TLS handshake, then the wait for the A-ASSOCIATE-RQ (each); also the ARTIM timer
    association_request_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    min_free_disk_mb: int = Field(default=1024, ge=0)  # below: 0xA700, PACS retries later
    max_backlog: int = Field(default=20000, ge=1)  # unprocessed instances before 0xA700
    # the largest PDU we receive (A-ASSOCIATE-AC maximum length; 0: no limit). pynetdicom's
    # 16382 makes a 512 KB CT slice 32 PDUs, each a turn of its reactor; 1 MiB makes it one
    max_pdu_bytes: int = Field(default=1 << 20, ge=0)
    tls_port: Port | None = None  # None: no TLS listener
    # listener processes sharing the port(s) (SO_REUSEPORT), so associations spread over cores;
    # the connection and association limits above apply to each
    processes: int = Field(default=1, ge=1, le=32)
    tls_cert_file: Path | None = None  # PEM server certificate (chain); required with tls_port
    tls_key_file: Path | None = None  # PEM private key, unencrypted
    tls_ca_file: Path | None = None  # PEM CA(s): client certificates required and verified

    @model_validator(mode="after")
    def _tls(self) -> ListenerSettings:
        if self.tls_port is None:
            return self
        if self.tls_cert_file is None or self.tls_key_file is None:
            raise ValueError("tls_port needs tls_cert_file and tls_key_file")
        if self.tls_port == self.port:
            raise ValueError("tls_port must differ from port")
        return self


# -- [convert] ---------------------------------------------------------------------------------

#: How the frames of a multi-frame object, or the slices of a series, are sampled (§4.5).
SamplingPolicy = Literal["all", "middle", "every_n", "max_k"]


def _window_width(window: tuple[float, float]) -> tuple[float, float]:
    if not window[1] >= 1.0:
        raise ValueError(f"preset_window width must be >= 1 (PS3.3 C.11.2.1.2), got {window}")
    return window


#: (center, width) in modality units (e.g. HU), used when the header has no VOI at all.
Window = Annotated[tuple[float, float], AfterValidator(_window_width)]


class ModalityChoices(Section):
    """The [convert] keys a [convert.modality.<MODALITY>] section may override.

    ``window_explanation`` selects the Window Center/Width pair whose Explanation matches
    (case-insensitive), before ``window_index``; an object with fewer pairs uses its first.
    ``preset_window`` is set per modality only: window values are in each modality's units.
    """

    section = "convert"

    window_index: int = Field(default=0, ge=0)
    window_explanation: str | None = None  # e.g. "LUNG"
    preset_window: Window | None = None
    frame_policy: SamplingPolicy = "middle"  # frames of one multi-frame object
    frame_param: int = Field(default=1, ge=1)  # n for every_n, k for max_k
    series_policy: SamplingPolicy = "all"  # slices of a series, decided per instance
    series_param: int = Field(default=1, ge=1)


class ModalityRule(overrides_of(ModalityChoices)):  # type: ignore[misc]
    """[convert.modality.<MODALITY>]: overrides for one Modality; None keeps [convert]'s value."""

    section = "convert.modality"


class ConvertSettings(ModalityChoices):
    """[convert]: spool file -> PNG, in a process pool on the listener host."""

    size: int = Field(default=512, ge=0)  # the endpoint resizes to exactly 512x512; 0: native
    processes: int = Field(default=2, ge=1)
    # Stretched to black/white when the header has no VOI and the modality no preset_window.
    percentiles: tuple[float, float] = (0.5, 99.5)
    # Decompression-bomb guards. 200 M pixels (Rows x Columns x Frames) is ~400 MB of 16-bit
    # data, more than any real radiograph or CT volume in one object; 1 GiB of decoded bytes
    # (selected frames, an inflated Deflated data set) holds 250 frames of a 2000x2000 cine.
    max_pixels: int = Field(default=200_000_000, ge=1)
    max_decoded_bytes: int = Field(default=1 << 30, ge=1)
    # Objects of other modalities, and of these SOP classes, end "skipped" with the reason.
    embed_modalities: tuple[str, ...] = DEFAULT_EMBED_MODALITIES
    skip_sop_classes: tuple[str, ...] = DEFAULT_SKIP_SOP_CLASSES
    modality: dict[str, ModalityRule] = Field(default_factory=dict)

    @field_validator("preset_window")
    @classmethod
    def _preset_per_modality(cls, value: tuple[float, float] | None) -> None:
        if value is not None:
            raise ValueError(
                "preset_window is set per modality, in [convert.modality.<MODALITY>]: "
                "window values are in each modality's units"
            )

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {value}")
        return value

    @field_validator("embed_modalities")
    @classmethod
    def _embed_modalities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        codes = tuple(code.strip().upper() for code in value)
        for code in codes:
            if not code or len(code) > 16:
                raise ValueError(f"{code!r} is not a DICOM Modality code such as CT, MR, CR")
        return codes

    @field_validator("modality")
    @classmethod
    def _modality_codes(cls, value: dict[str, ModalityRule]) -> dict[str, ModalityRule]:
        # Env var names arrive lower-cased ("ct"), TOML keys as written ("CT"): one code, merged
        # key by key; the same key set to two different values is refused, not guessed.
        merged: dict[str, dict[str, Any]] = {}
        for code, rule in value.items():
            upper = code.strip().upper()
            if not 1 <= len(upper) <= 16 or not upper.replace("_", "").isalnum():
                raise ValueError(f"{code!r} is not a DICOM Modality code such as CT, MR, CR")
            into = merged.setdefault(upper, {})
            for key, setting in rule.model_dump(exclude_none=True).items():
                if into.setdefault(key, setting) != setting:
                    raise ValueError(f"{upper}.{key} is set twice, differently (codes ignore case)")
        return {code: ModalityRule.model_validate(rule) for code, rule in merged.items()}


# -- [queue] [redis] ---------------------------------------------------------------------------


class QueueSettings(Section):
    """How converted images become embed jobs."""

    section = "queue"

    batch_size: int = Field(default=16, ge=1, le=256)
    batch_max_bytes: int = Field(default=4_000_000, ge=100_000)
    linger_seconds: float = Field(default=1.0, ge=0.0)  # wait this long for more of a series
    job_timeout_seconds: int = Field(default=900, ge=10)
    max_retries: int = Field(default=5, ge=0)
    max_queued_jobs: int = Field(default=256, ge=1)  # conversion pauses above this queue depth


class RedisSettings(Section):
    """None means: `pacs-embed run` starts a private redis-server under the state dir."""

    section = "redis"

    url: str | None = None


# -- [endpoint] [emulator] ---------------------------------------------------------------------


class EndpointSettings(Section):
    """The MedImageInsight online endpoint. url None: `run` starts the local emulator.

    ``auth``: "key" sends the endpoint key; "entra" a Microsoft Entra token from azure-identity
    (the managed identity ``managed_identity_client_id`` when set, else DefaultAzureCredential);
    "none" nothing (a local emulator without a key). The fleet-wide in-flight limit defaults to
    the deployment's max_concurrent_requests_per_instance x instances: Azure ML answers 429 only
    past twice that, which leaves room for retries and other clients.
    """

    section = "endpoint"

    url: str | None = None
    auth: Literal["key", "entra", "none"] = "key"
    key: SecretStr | None = None
    key_file: Path | None = None
    managed_identity_client_id: str | None = None
    deployment: str | None = None  # sent as the azureml-model-deployment header
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=6, ge=1)
    backoff_base: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)
    deadline: float = Field(default=600.0, gt=0)  # per call, retries and slot waits included
    max_concurrent_requests_per_instance: int = Field(default=1, ge=1)
    instances: int = Field(default=1, ge=1)
    max_in_flight: int | None = Field(default=None, ge=0)  # None: the product above; 0: no limit
    lease_seconds: float = Field(default=30.0, ge=1)  # a dead worker's slot is free after this

    @property
    def in_flight_limit(self) -> int:
        """Requests in flight at most, fleet-wide (0: unlimited)."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        return self.max_concurrent_requests_per_instance * self.instances


Rate = Annotated[float, Field(ge=0.0, le=1.0)]


class FaultPlan(Section):
    """How the emulator misbehaves on purpose, for a whole run (see ``emulator.faults``).

    Rates are per request, drawn independently of the content, and add up to at most 1.
    """

    section = "emulator"

    latency_ms: float = Field(default=0.0, ge=0)  # an answer takes this long, its work included
    latency_per_image_ms: float = Field(default=0.0, ge=0)  # ... plus this per image row
    capacity: int = Field(default=0, ge=0)  # requests in flight before 429; 0: unlimited
    rate_429: Rate = 0.0
    rate_503: Rate = 0.0
    rate_500: Rate = 0.0
    rate_408: Rate = 0.0
    rate_hang: Rate = 0.0  # no answer until the client gives up (or hang_seconds)
    rate_malformed: Rate = 0.0  # 200 with a truncated body
    retry_after_seconds: float | None = Field(default=None, ge=0)  # on 429/503; None: no header
    cold_start_seconds: float = Field(default=0.0, ge=0)  # every request gets 503 this long
    hang_seconds: float = Field(default=300.0, gt=0)  # a hung request is dropped after this
    seed: int | None = None  # fault draws repeat for a seed

    @model_validator(mode="after")
    def _rates_add_up(self) -> FaultPlan:
        rates = self.rates()
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"fault rates add up to more than 1: {rates}")
        return self

    def rates(self) -> dict[str, float]:
        """Fault name -> probability per request."""
        return {
            "429": self.rate_429,
            "503": self.rate_503,
            "500": self.rate_500,
            "408": self.rate_408,
            "hang": self.rate_hang,
            "malformed": self.rate_malformed,
        }


class EmulatorSettings(FaultPlan):
    """The local stand-in endpoint and the faults it injects. NOT a medical model: see emulator/.

    ``response_shape`` "rows" answers a list of rows as real
    deployments do, "columns" the documentation's object of lists.
    """

    host: str = "127.0.0.1"
    port: Port = 8765
    key: SecretStr | None = None
    key_file: Path | None = None
    response_shape: Literal["rows", "columns"] = "rows"


# -- [sinks] -----------------------------------------------------------------------------------
# Where results leave pacs-embed (pipeline/sinks). Each sink is off until its address is set.
# Secrets (token, password, secret) come only from env vars or files, as the endpoint key does.

Seconds = Annotated[float, Field(gt=0, le=3600)]


class DicomSinkSettings(Section):
    """[sinks.dicom]: C-STORE of our SR/KOS objects to a DICOM node, passed whole to
    ``pipeline.sinks.DicomSink``. ``host`` None: off. With ``tls`` the peer's certificate is
    checked against ``tls_ca_file`` (else the system CAs) and its host name; ``tls_cert_file``
    and ``tls_key_file`` add a client certificate for peers that require one."""

    section = "sinks.dicom"

    host: str | None = None
    port: Port = 104
    ae_title: Annotated[str, AfterValidator(_ae_title)] | None = None  # the peer's (called) AE
    calling_ae_title: Annotated[str, AfterValidator(_ae_title)] = "PACS_EMBED"
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    timeout_seconds: Seconds = 30.0  # connect, association, each DIMSE answer

    @model_validator(mode="after")
    def _complete(self) -> DicomSinkSettings:
        if self.host is not None and self.ae_title is None:
            raise ValueError("host needs ae_title, the AE title of the node stored to")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self


class DicomWebSinkSettings(Section):
    """[sinks.dicomweb]: STOW-RS of the same objects to a DICOMweb service root (``url``, e.g.
    ``https://pacs.example/dicom-web``); None: off. ``auth`` "bearer" sends ``token``, "basic"
    ``username`` and ``password``; token and password from env or their ``*_file`` only."""

    section = "sinks.dicomweb"

    url: str | None = None
    auth: Literal["none", "bearer", "basic"] = "none"
    token: SecretStr | None = None
    token_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls_ca_file: Path | None = None  # PEM CA(s) for an https url; unset: the system CAs
    timeout_seconds: Seconds = 30.0

    @model_validator(mode="after")
    def _credentials(self) -> DicomWebSinkSettings:
        if self.url is None:
            return self
        if self.auth == "bearer" and self.token is None and self.token_file is None:
            raise ValueError("auth bearer needs token (env) or token_file")
        if self.auth == "basic" and (
            self.username is None or (self.password is None and self.password_file is None)
        ):
            raise ValueError("auth basic needs username and password (env) or password_file")
        return self


class WebhookSinkSettings(Section):
    """[sinks.webhook]: a signed JSON POST per study version; ``url`` None: off. The body is
    signed with ``secret`` (env only) or the content of ``secret_file``."""

    section = "sinks.webhook"

    url: str | None = None
    secret: SecretStr | None = None
    secret_file: Path | None = None
    include_vectors: bool = False  # also send each series' embedding (1024 floats)
    timeout_seconds: Seconds = 10.0

    @model_validator(mode="after")
    def _signed(self) -> WebhookSinkSettings:
        if self.url is not None and self.secret is None and self.secret_file is None:
            raise ValueError("url needs secret (env) or secret_file: every body is signed")
        return self


class SinksSettings(Section):
    """[sinks.*]: the sinks, one sub-section each (env ``PACS_EMBED_SINKS__DICOM__HOST``)."""

    section = "sinks"

    dicom: DicomSinkSettings = DicomSinkSettings()
    dicomweb: DicomWebSinkSettings = DicomWebSinkSettings()
    webhook: WebhookSinkSettings = WebhookSinkSettings()


# -- [study] [spool] ---------------------------------------------------------------------------


class StudySettings(Section):
    """When a study version is complete, and its results are pushed (pipeline/studies.py)."""

    section = "study"

    stable_seconds: float = Field(default=60.0, gt=0)  # no new instance for this long, all final
    max_wait_seconds: float = Field(default=3600.0, gt=0)  # then complete with what is final


class SpoolSettings(Section):
    """Spool retention (dicom_listener/retention.py): a delivered instance's file is deleted
    ``retention_hours`` after delivery (0: kept), earlier while free disk is under
    ``cleanup_free_disk_mb`` (keep it above ``listener.min_free_disk_mb``, which refuses)."""

    section = "spool"

    retention_hours: float = Field(default=24.0, ge=0)
    cleanup_free_disk_mb: int = Field(default=4096, ge=0)


# -- the rest ----------------------------------------------------------------------------------


class WorkerSettings(Section):
    """Embed workers; `count` is how many `run` starts, `concurrency` how many jobs each runs at
    once. A job spends time outside its request (the store, verdicts, rq's bookkeeping): with
    two at once one request is on the wire while the other job is prepared or finished, so
    `count` workers keep `count x concurrency` endpoint slots busy. Requests in flight stay
    bounded by the fleet-wide limit (`endpoint.max_in_flight`); past it jobs wait for a slot."""

    section = "workers"

    count: int = Field(default=2, ge=1, le=64)
    concurrency: int = Field(default=2, ge=1, le=16)


class AdminSettings(Section):
    """Status/health HTTP endpoint. Without a token one is generated under the state dir."""

    section = "admin"

    host: str = "127.0.0.1"
    port: Port = 8080
    token: SecretStr | None = None
    token_file: Path | None = None


class DetectSettings(Section):
    """Verdicts (pipeline/detect): calibrated outlier flags and the zero-shot label check.

    Every worker must run with the same values: they share the reference sets in Redis.
    """

    section = "detect"

    enabled: bool = True
    cohort_fields: list[Literal["modality", "body_part", "view"]] = Field(
        default=["modality", "body_part"], min_length=1
    )
    body_part_aliases: dict[str, str] = Field(default_factory=dict)  # site spellings -> term
    k: int = Field(default=10, ge=1, le=100)
    alpha: float = Field(default=0.01, gt=0.0, lt=1.0)
    min_reference: int = Field(default=100, ge=2)
    max_reference: int = Field(default=2000, ge=2, le=100_000)
    trim_mads: float = Field(default=10.0, gt=0.0)
    label_check: bool = True
    label_margin: float = Field(default=0.1, ge=0.0, lt=1.0)
    label_modalities: dict[str, str] = Field(
        default_factory=lambda: {"CR": "XR", "DX": "XR", "RG": "XR"}
    )
    label_prompts: dict[str, str] = Field(
        default_factory=lambda: {
            "XR/CHEST": "x-ray chest posteroanterior",
            "XR/ABDOMEN": "x-ray abdomen anteroposterior",
            "XR/HAND": "x-ray hand posteroanterior",
            "XR/KNEE": "x-ray knee anteroposterior",
            "CT/CHEST": "ct chest axial",
            "CT/ABDOMEN": "ct abdomen axial",
            "CT/HEAD": "ct head axial",
            "MR/HEAD": "mri brain axial t2",
            "MR/KNEE": "mri knee sagittal proton density",
            "US/ABDOMEN": "ultrasound abdomen",
            "MG/BREAST": "mammography breast craniocaudal",
        }
    )

    @model_validator(mode="after")
    def _calibration_is_possible(self) -> DetectSettings:
        # The smallest conformal p-value a reference of n gives is 1/(n+1): below 1/alpha
        # images, p < alpha is impossible and nothing would ever be flagged.
        if (self.min_reference + 1) * self.alpha <= 1.0:
            raise ValueError(
                f"min_reference ({self.min_reference}) must be at least 1/alpha "
                f"({math.ceil(1 / self.alpha - 1e-9)} for alpha {self.alpha}): a reference of n "
                "images gives p-values no smaller than 1/(n+1), so no image could ever be flagged"
            )
        if self.max_reference < self.min_reference:
            raise ValueError(
                f"max_reference ({self.max_reference}) is below min_reference "
                f"({self.min_reference})"
            )
        if self.k >= self.min_reference:
            raise ValueError(f"k ({self.k}) must be below min_reference ({self.min_reference})")
        return self


class LogSettings(Section):
    section = "log"

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
