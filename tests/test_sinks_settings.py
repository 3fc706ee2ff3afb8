"""[sinks.*]: three-level env names, TOML, secrets only from env or file, errors by key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PACS_EMBED_"):
            monkeypatch.delenv(name)


def test_sinks_are_off_by_default() -> None:
    """No sink has an address out of the box, so nothing leaves pacs-embed unasked."""
    sinks = Settings.load().sinks
    assert sinks.dicom.host is None and sinks.dicomweb.url is None and sinks.webhook.url is None
    assert sinks.dicom.calling_ae_title == "PACS_EMBED" and not sinks.webhook.include_vectors


def test_three_level_env_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """PACS_EMBED_SINKS__DICOM__HOST reaches [sinks.dicom] host, and env beats the TOML file,
    key by key, the file's other keys kept."""
    config = tmp_path / "c.toml"
    config.write_text('[sinks.dicom]\nhost = "from-toml"\nae_title = "PACS"\nport = 11113\n')
    monkeypatch.setenv("PACS_EMBED_SINKS__DICOM__HOST", "pacs.example")
    monkeypatch.setenv("PACS_EMBED_SINKS__DICOM__AE_TITLE", "MAIN_PACS")
    monkeypatch.setenv("PACS_EMBED_SINKS__WEBHOOK__URL", "https://hooks.example/x")
    monkeypatch.setenv("PACS_EMBED_SINKS__WEBHOOK__SECRET", "s3cret")
    settings = Settings.load(config)
    dicom = settings.sinks.dicom
    assert (dicom.host, dicom.ae_title, dicom.port) == ("pacs.example", "MAIN_PACS", 11113)
    assert settings.sinks.webhook.url == "https://hooks.example/x"
    assert settings.webhook_secret() == "s3cret"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("table", "key", "env"),
    [
        ("sinks.webhook", "secret", "PACS_EMBED_SINKS__WEBHOOK__SECRET"),
        ("sinks.dicomweb", "token", "PACS_EMBED_SINKS__DICOMWEB__TOKEN"),
        ("sinks.dicomweb", "password", "PACS_EMBED_SINKS__DICOMWEB__PASSWORD"),
    ],
)
def test_secret_in_toml_is_refused(tmp_path: Path, table: str, key: str, env: str) -> None:
    """A sink secret written in the config file is refused, naming the env var to use."""
    config = tmp_path / "c.toml"
    config.write_text(f'[{table}]\n{key} = "s3cret"\n')
    with pytest.raises(ConfigError, match=env) as caught:
        Settings.load(config)
    assert "s3cret" not in str(caught.value)


def test_secrets_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The webhook secret, bearer token and basic password are read from their files."""
    for name, value in (("secret", "hmac-key"), ("token", "bearer-t"), ("password", "pw")):
        (tmp_path / name).write_text(value + "\n")
    monkeypatch.setenv("PACS_EMBED_SINKS__WEBHOOK__URL", "https://hooks.example/x")
    monkeypatch.setenv("PACS_EMBED_SINKS__WEBHOOK__SECRET_FILE", str(tmp_path / "secret"))
    monkeypatch.setenv("PACS_EMBED_SINKS__DICOMWEB__TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("PACS_EMBED_SINKS__DICOMWEB__PASSWORD_FILE", str(tmp_path / "password"))
    settings = Settings.load()
    assert settings.webhook_secret() == "hmac-key"
    assert settings.dicomweb_token() == "bearer-t"
    assert settings.dicomweb_password() == "pw"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PACS_EMBED_SINKS__DICOM__PORT", "0", r"sinks\.dicom\.port"),
        ("PACS_EMBED_SINKS__DICOM__CALLING_AE_TITLE", "X" * 17, r"sinks\.dicom\.calling_ae_title"),
        ("PACS_EMBED_SINKS__DICOMWEB__AUTH", "digest", r"sinks\.dicomweb\.auth"),
        ("PACS_EMBED_SINKS__WEBHOOK__TIMEOUT_SECONDS", "0", r"sinks\.webhook\.timeout_seconds"),
        ("PACS_EMBED_SINKS__WEBHOOK__URL", "https://hooks.example/", r"sinks\.webhook: .*secret"),
        ("PACS_EMBED_SINKS__DICOM__HOST", "pacs.example", r"sinks\.dicom: .*ae_title"),
    ],
)
def test_bad_values_name_the_key(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    """A bad sink setting stops the start-up with its full dotted key."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        Settings.load()
