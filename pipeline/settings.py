"""The settings: the sections of :mod:`pipeline.sections`, built once at start-up and handed down.

Sources, strongest first: environment variables ``PACS_EMBED_<SECTION>__<KEY>`` (plus
``PACS_EMBED_STATE_DIR``), then the TOML file given with ``--config``, then the defaults written
in the sections (``config/default.toml`` is a commented copy of them, checked by a test). Secrets
— endpoint key, admin token, emulator key, the sinks' token, password and webhook secret — come
only from env vars or files: a TOML file holding one is refused, because config files get copied
into tickets and repositories. ``[sinks.dicom]`` nests: ``PACS_EMBED_SINKS__DICOM__HOST``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pipeline.errors import ConfigError
from pipeline.sections import (
    AdminSettings,
    ConvertSettings,
    DetectSettings,
    EmulatorSettings,
    EndpointSettings,
    FaultPlan,
    ListenerSettings,
    LogSettings,
    ModalityRule,
    QueueSettings,
    RedisSettings,
    SinksSettings,
    SpoolSettings,
    StudySettings,
    WorkerSettings,
    error_lines,
)

__all__ = [
    "SECRET_KEYS",
    "AdminSettings",
    "ConvertSettings",
    "DetectSettings",
    "EmulatorSettings",
    "EndpointSettings",
    "FaultPlan",
    "ListenerSettings",
    "LogSettings",
    "ModalityRule",
    "QueueSettings",
    "RedisSettings",
    "Settings",
    "SinksSettings",
    "SpoolSettings",
    "StudySettings",
    "WorkerSettings",
    "read_secret",
    "read_toml",
]

#: TOML keys that must never hold a value: (section, key).
SECRET_KEYS = (
    ("endpoint", "key"),
    ("admin", "token"),
    ("emulator", "key"),
    ("sinks.dicomweb", "token"),
    ("sinks.dicomweb", "password"),
    ("sinks.webhook", "secret"),
)


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
    sinks: SinksSettings = SinksSettings()
    study: StudySettings = StudySettings()
    spool: SpoolSettings = SpoolSettings()

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

    def webhook_secret(self) -> str | None:
        return read_secret(self.sinks.webhook.secret, self.sinks.webhook.secret_file)

    def dicomweb_token(self) -> str | None:
        return read_secret(self.sinks.dicomweb.token, self.sinks.dicomweb.token_file)

    def dicomweb_password(self) -> str | None:
        return read_secret(self.sinks.dicomweb.password, self.sinks.dicomweb.password_file)


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
        table: Any = data
        for part in section.split("."):  # "sinks.webhook" is the table [sinks.webhook]
            table = table.get(part) if isinstance(table, dict) else None
        if isinstance(table, dict) and key in table:
            env = f"PACS_EMBED_{section.upper().replace('.', '__')}__{key.upper()}"
            raise ConfigError(
                f"{path}: [{section}] {key} is a secret; set {env} or [{section}] {key}_file "
                "instead of writing it in the file"
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
    return "\n".join([f"invalid settings{where}:", *(f"  {line}" for line in error_lines(exc))])
