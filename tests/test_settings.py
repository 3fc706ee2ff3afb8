"""Settings: defaults, TOML, env precedence, secrets policy, clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("PACS_EMBED_"):
            monkeypatch.delenv(name)


def test_defaults_match_design() -> None:
    """Out of the box: DICOM 11112 as PACS_EMBED, admin 127.0.0.1:8080, emulator 8765, ./var."""
    s = Settings.load()
    assert (s.listener.port, s.listener.ae_title) == (11112, "PACS_EMBED")
    assert (s.admin.host, s.admin.port) == ("127.0.0.1", 8080)
    assert s.emulator.port == 8765
    assert s.state_dir == Path("var")
    assert s.redis.url is None and s.endpoint.url is None
    assert s.queue.batch_size == 16


def test_default_toml_is_the_defaults() -> None:
    """config/default.toml documents exactly the built-in defaults, so it cannot drift."""
    from_file = Settings.load(ROOT / "config" / "default.toml")
    assert from_file == Settings.load()
    # and it mentions every section, so the reference is complete
    with open(ROOT / "config" / "default.toml", "rb") as handle:
        sections = set(tomllib.load(handle))
    assert sections >= {name for name, f in Settings.model_fields.items() if name != "state_dir"}


def test_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PACS_EMBED_<SECTION>__<KEY> beats the TOML file, which beats the defaults."""
    config = tmp_path / "c.toml"
    config.write_text('[listener]\nport = 2000\nae_title = "FROM_TOML"\n[admin]\nport = 9000\n')
    monkeypatch.setenv("PACS_EMBED_LISTENER__PORT", "3000")
    monkeypatch.setenv("PACS_EMBED_STATE_DIR", str(tmp_path / "state"))
    s = Settings.load(config)
    assert s.listener.port == 3000
    assert s.listener.ae_title == "FROM_TOML"
    assert s.admin.port == 9000
    assert s.state_dir == tmp_path / "state"


def test_secret_in_toml_is_refused(tmp_path: Path) -> None:
    """An endpoint key written in a config file is refused, naming the env var to use."""
    config = tmp_path / "c.toml"
    config.write_text('[endpoint]\nurl = "https://x.example/score"\nkey = "s3cret"\n')
    with pytest.raises(ConfigError, match="PACS_EMBED_ENDPOINT__KEY"):
        Settings.load(config)


def test_secret_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets come from the env var, else from the *_file; the value never shows in repr."""
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("PACS_EMBED_ENDPOINT__KEY_FILE", str(key_file))
    s = Settings.load()
    assert s.endpoint_key() == "from-file"
    monkeypatch.setenv("PACS_EMBED_ENDPOINT__KEY", "from-env")
    s = Settings.load()
    assert s.endpoint_key() == "from-env"
    assert "from-env" not in repr(s)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PACS_EMBED_LISTENER__PORT", "70000", "listener.port"),
        ("PACS_EMBED_LISTENER__AE_TITLE", "A_TITLE_LONGER_THAN_16", "listener.ae_title"),
        ("PACS_EMBED_QUEUE__BATCH_SIZE", "0", "queue.batch_size"),
        ("PACS_EMBED_LISTENER__NO_SUCH_KEY", "1", "listener.no_such_key"),
    ],
)
def test_invalid_settings_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    """A bad value fails at start-up with a ConfigError that names the setting."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        Settings.load()


def test_bad_toml_is_a_clear_error(tmp_path: Path) -> None:
    """Unparseable TOML and a missing file are ConfigErrors naming the file."""
    config = tmp_path / "c.toml"
    config.write_text("[listener\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.load(config)
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.load(tmp_path / "missing.toml")
