"""One typed settings object, built once at start-up and handed down.

Sources, strongest first: environment variables ``PACS_EMBED_<SECTION>__<KEY>`` (plus
``PACS_EMBED_STATE_DIR``), then the TOML file given with ``--config``, then the defaults written
here (``config/default.toml`` is a commented copy of them, checked by a test). Secrets — endpoint
key, admin token, emulator key — come only from env vars or files: a TOML file holding one is
refused, because config files get copied into tickets and repositories.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pipeline.errors import ConfigError
from pipeline.vocabulary import DEFAULT_EMBED_MODALITIES, DEFAULT_SKIP_SOP_CLASSES

if TYPE_CHECKING:
    from pipeline.convert.options import ConvertOptions

Port = Annotated[int, Field(ge=1, le=65535)]

#: TOML keys that must never hold a value: (section, key).
SECRET_KEYS = (("endpoint", "key"), ("admin", "token"), ("emulator", "key"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerSettings(_Section):
    """The DICOM Storage SCP."""

    host: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens for its PACS; restrict with allowed_*
    port: Port = 11112
    ae_title: str = "PACS_EMBED"
    allowed_calling_aets: list[str] = Field(default_factory=list)  # empty: any calling AE
    require_called_aet: bool = True  # associations addressed to another AE title are rejected
    accept_unknown_sop_classes: bool = False  # private/unknown storage classes (like Orthanc's)
    max_associations: int = Field(default=16, ge=1)
    min_free_disk_mb: int = Field(default=1024, ge=0)  # below: 0xA700, PACS retries later
    max_backlog: int = Field(default=20000, ge=1)  # unprocessed instances before 0xA700

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not 1 <= len(value) <= 16 or "\\" in value or not value.isascii() or not value.strip():
            raise ValueError("an AE title is 1-16 ASCII characters, not all spaces, no backslash")
        return value


SamplingPolicy = Literal["all", "middle", "every_n", "max_k"]


class ModalityConvertSettings(_Section):
    """[convert.modality.<MODALITY>]: overrides for one modality; unset keys keep [convert]'s."""

    window_index: int | None = Field(default=None, ge=0)
    window_explanation: str | None = None  # e.g. "LUNG": the header pair with this explanation
    preset_window: tuple[float, float] | None = None  # (center, width) when the header has no VOI
    frame_policy: SamplingPolicy | None = None
    frame_param: int | None = Field(default=None, ge=1)
    series_policy: SamplingPolicy | None = None
    series_param: int | None = Field(default=None, ge=1)


class ConvertSettings(_Section):
    """Spool file -> PNG, on the listener host."""

    size: int = Field(default=512, ge=0)  # the endpoint resizes to exactly 512x512
    processes: int = Field(default=2, ge=1)
    frame_policy: SamplingPolicy = "middle"  # frames of one multi-frame object
    frame_param: int = Field(default=1, ge=1)
    series_policy: SamplingPolicy = "all"  # slices of a series, decided per instance
    series_param: int = Field(default=1, ge=1)
    window_index: int = Field(default=0, ge=0)
    window_explanation: str | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)  # stretch when no VOI and no preset
    max_pixels: int = Field(default=200_000_000, ge=1)  # Rows x Columns x Frames
    max_decoded_bytes: int = Field(default=1 << 30, ge=1)
    # Objects of other modalities, and of these SOP classes, end "skipped" with the reason.
    embed_modalities: list[str] = Field(default_factory=lambda: [*DEFAULT_EMBED_MODALITIES])
    skip_sop_classes: list[str] = Field(default_factory=lambda: [*DEFAULT_SKIP_SOP_CLASSES])
    modality: dict[str, ModalityConvertSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _options_are_valid(self) -> ConvertSettings:
        # ConvertOptions owns the rules (window width, percentiles, policies): build it once
        # here so a bad value stops the start-up instead of the first conversion.
        try:
            self.options()
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return self

    @field_validator("modality")
    @classmethod
    def _modality_codes(
        cls, value: dict[str, ModalityConvertSettings]
    ) -> dict[str, ModalityConvertSettings]:
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
        return {code: ModalityConvertSettings(**rule) for code, rule in merged.items()}

    def options(
        self, *, native_size: bool = False, body_part_aliases: dict[str, str] | None = None
    ) -> ConvertOptions:
        """The pipeline's ConvertOptions; imported late so settings stay light to import."""
        from pipeline.convert.options import ConvertOptions, ModalityRule

        rules = tuple(
            (code, ModalityRule(**rule.model_dump())) for code, rule in self.modality.items()
        )
        exclude = {"size", "processes", "modality", "embed_modalities", "skip_sop_classes"}
        return ConvertOptions(
            size=0 if native_size else self.size,
            **self.model_dump(exclude=exclude),
            modalities=rules,
            embed_modalities=tuple(code.strip().upper() for code in self.embed_modalities),
            skip_sop_classes=tuple(self.skip_sop_classes),
            body_part_aliases=tuple(sorted((body_part_aliases or {}).items())),
        )


class QueueSettings(_Section):
    """How converted images become embed jobs."""

    batch_size: int = Field(default=16, ge=1, le=256)
    batch_max_bytes: int = Field(default=4_000_000, ge=100_000)
    linger_seconds: float = Field(default=1.0, ge=0.0)  # wait this long for more of a series
    job_timeout_seconds: int = Field(default=900, ge=10)
    max_retries: int = Field(default=5, ge=0)
    max_queued_jobs: int = Field(default=256, ge=1)  # conversion pauses above this queue depth


class RedisSettings(_Section):
    """None means: `pacs-embed run` starts a private redis-server under the state dir."""

    url: str | None = None


class EndpointSettings(_Section):
    """The MedImageInsight online endpoint. url None: `run` starts the local emulator.

    ``auth``: "key" sends the endpoint key; "entra" a Microsoft Entra token from azure-identity
    (the managed identity ``managed_identity_client_id`` when set, else DefaultAzureCredential);
    "none" nothing (a local emulator without a key). The fleet-wide in-flight limit defaults to
    the deployment's max_concurrent_requests_per_instance x instances: Azure ML answers 429 only
    past twice that, which leaves room for retries and other clients.
    """

    url: str | None = None
    auth: Literal["key", "entra", "none"] = "key"
    key: SecretStr | None = None
    key_file: Path | None = None
    managed_identity_client_id: str | None = None
    deployment: str | None = None
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


class EmulatorSettings(_Section):
    """The local stand-in endpoint and the faults it injects. NOT a medical model: see emulator/."""

    host: str = "127.0.0.1"
    port: Port = 8765
    key: SecretStr | None = None
    key_file: Path | None = None
    response_shape: Literal["rows", "columns"] = "rows"
    latency_ms: float = Field(default=0.0, ge=0)
    latency_per_image_ms: float = Field(default=0.0, ge=0)
    capacity: int = Field(default=0, ge=0)  # requests in flight before 429; 0: unlimited
    rate_429: Rate = 0.0
    rate_503: Rate = 0.0
    rate_500: Rate = 0.0
    rate_408: Rate = 0.0
    rate_hang: Rate = 0.0
    rate_malformed: Rate = 0.0
    retry_after_seconds: float | None = Field(default=None, ge=0)
    cold_start_seconds: float = Field(default=0.0, ge=0)
    hang_seconds: float = Field(default=300.0, gt=0)
    seed: int | None = None


class WorkerSettings(_Section):
    """Embed workers; `count` is how many `run` starts."""

    count: int = Field(default=2, ge=1, le=64)


class AdminSettings(_Section):
    """Status/health HTTP endpoint. Without a token one is generated under the state dir."""

    host: str = "127.0.0.1"
    port: Port = 8080
    token: SecretStr | None = None
    token_file: Path | None = None


class DetectSettings(_Section):
    """Verdicts (pipeline/detect): calibrated outlier flags and the zero-shot label check.

    Every worker must run with the same values: they share the reference sets in Redis.
    """

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


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class Settings(BaseSettings):
    """Everything pacs-embed can be told. Build with :meth:`load`."""

    model_config = SettingsConfigDict(
        env_prefix="PACS_EMBED_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    state_dir: Path = Path("var")
    listener: ListenerSettings = ListenerSettings()
    convert: ConvertSettings = ConvertSettings()
    queue: QueueSettings = QueueSettings()
    redis: RedisSettings = RedisSettings()
    endpoint: EndpointSettings = EndpointSettings()
    emulator: EmulatorSettings = EmulatorSettings()
    workers: WorkerSettings = WorkerSettings()
    admin: AdminSettings = AdminSettings()
    log: LogSettings = LogSettings()
    detect: DetectSettings = DetectSettings()

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Defaults < TOML file < env vars < ``overrides``; every problem in one ConfigError."""
        data = read_toml(config_file) if config_file else {}

        class _WithFile(cls):  # type: ignore[valid-type,misc]
            @classmethod
            def settings_customise_sources(
                cls,
                settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                return (init_settings, env_settings, _DictSource(settings_cls, data))

        try:
            loaded = _WithFile(**overrides)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, config_file)) from exc
        return cls.model_validate(loaded.model_dump())

    # Paths under the state dir, so every process agrees on the layout.
    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.state_dir / "quarantine"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    def endpoint_key(self) -> str | None:
        return read_secret(self.endpoint.key, self.endpoint.key_file)

    def emulator_key(self) -> str | None:
        return read_secret(self.emulator.key, self.emulator.key_file)

    def admin_token(self) -> str | None:
        return read_secret(self.admin.token, self.admin.token_file)


class _DictSource(PydanticBaseSettingsSource):
    """Feeds an already-parsed TOML document to pydantic-settings at the lowest priority."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse the config file and refuse secrets in it."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    for section, key in SECRET_KEYS:
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ConfigError(
                f"{path}: [{section}] {key} is a secret; set PACS_EMBED_{section.upper()}__"
                f"{key.upper()} or [{section}] {key}_file instead of writing it in the file"
            )
    return data


def read_secret(value: SecretStr | None, file: Path | None) -> str | None:
    """A secret from its env var, else from its file (stripped); None when neither is set."""
    if value is not None:
        return value.get_secret_value()
    if file is None:
        return None
    try:
        return file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {file}: {exc.strerror}") from exc


def _explain(exc: ValidationError, config_file: Path | None) -> str:
    where = f" (from {config_file} or PACS_EMBED_* environment variables)" if config_file else ""
    lines = [f"invalid settings{where}:"]
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"])
        lines.append(f"  {name}: {error['msg']}")
    return "\n".join(lines)
