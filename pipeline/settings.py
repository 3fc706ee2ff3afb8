"""One typed settings object, built once at start-up and handed down.

Sources, strongest first: environment variables ``PACS_EMBED_<SECTION>__<KEY>`` (plus
``PACS_EMBED_STATE_DIR``), then the TOML file given with ``--config``, then the defaults written
here (``config/default.toml`` is a commented copy of them, checked by a test). Secrets — endpoint
key, admin token, emulator key — come only from env vars or files: a TOML file holding one is
refused, because config files get copied into tickets and repositories.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pipeline.errors import ConfigError

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
    max_associations: int = Field(default=16, ge=1)
    min_free_disk_mb: int = Field(default=1024, ge=0)  # below: 0xA700, PACS retries later
    max_backlog: int = Field(default=20000, ge=1)  # unprocessed instances before 0xA700

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not 1 <= len(value) <= 16 or "\\" in value or not value.isascii() or not value.strip():
            raise ValueError("an AE title is 1-16 ASCII characters, not all spaces, no backslash")
        return value


class ConvertSettings(_Section):
    """Spool file -> PNG, on the listener host."""

    size: int = Field(default=512, ge=0)  # the endpoint resizes to exactly 512x512
    processes: int = Field(default=2, ge=1)
    frame_policy: Literal["all", "middle", "every_n", "max_k"] = "middle"
    frame_param: int = Field(default=1, ge=1)
    window_index: int = Field(default=0, ge=0)


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
    """The MedImageInsight online endpoint. url None: `run` starts the local emulator."""

    url: str | None = None
    key: SecretStr | None = None
    key_file: Path | None = None
    deployment: str | None = None
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=6, ge=1)
    backoff_base: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)


class EmulatorSettings(_Section):
    """The local stand-in endpoint. NOT a medical model: see emulator/."""

    host: str = "127.0.0.1"
    port: Port = 8765
    key: SecretStr | None = None
    key_file: Path | None = None
    response_shape: Literal["rows", "columns"] = "rows"
    latency_ms: float = Field(default=0.0, ge=0)


class WorkerSettings(_Section):
    """Embed workers; `count` is how many `run` starts."""

    count: int = Field(default=2, ge=1, le=64)


class AdminSettings(_Section):
    """Status/health HTTP endpoint. Without a token one is generated under the state dir."""

    host: str = "127.0.0.1"
    port: Port = 8080
    token: SecretStr | None = None
    token_file: Path | None = None


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
