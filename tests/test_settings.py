"""Settings: defaults, TOML, env precedence, secrets policy, clear errors."""

from __future__ import annotations

import dataclasses
import inspect
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel

from dicom_listener import dispatcher
from dicom_listener import server as listener_server
from dicom_listener.dispatcher import Dispatcher, DispatchLimits
from emulator import faults, handler
from emulator import server as emulator_server
from emulator.server import EmulatorServer
from pacs_embed import cli, compose
from pipeline import sections
from pipeline import settings as composition
from pipeline.convert import options
from pipeline.convert.options import ConvertOptions
from pipeline.embed import client
from pipeline.embed.client import EndpointClient
from pipeline.errors import ConfigError
from pipeline.sections import (
    ConvertSettings,
    EmulatorSettings,
    EndpointSettings,
    FaultPlan,
    ModalityChoices,
    ModalityRule,
    QueueSettings,
)
from pipeline.settings import Settings
from workers import main as worker_main

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


# --- one declaration per setting ----------------------------------------------------------------

#: Where settings are declared and where they are used to build the runtime objects.
MODULES: tuple[ModuleType, ...] = (
    sections,
    composition,
    options,
    dispatcher,
    listener_server,
    faults,
    handler,
    emulator_server,
    client,
    worker_main,
    compose,
    cli,
)

#: The objects the code is handed, one per concept, and the section each one is.
RUNTIME: dict[type[BaseModel], type[BaseModel]] = {
    ConvertOptions: ConvertSettings,  # + the body part aliases; pickled into the pool
    DispatchLimits: QueueSettings,  # + in_flight
    EmulatorSettings: FaultPlan,  # the emulator's whole config
    EndpointSettings: EndpointSettings,  # passed to EndpointClient as is
    ModalityRule: ModalityRule,
}

#: The sections composed by Settings, and the sub-sections they compose ([sinks.dicom]); two of
#: them may share a key name (listener.port, admin.port, sinks.dicom.port).
SECTIONS = {f.annotation for f in Settings.model_fields.values()} - {Path}
SECTIONS |= {
    f.annotation
    for section in list(SECTIONS)
    for f in section.model_fields.values()  # type: ignore[union-attr]
    if isinstance(f.annotation, type) and issubclass(f.annotation, sections.Section)
}


def _declared(cls: type) -> set[str]:
    """The fields a class declares in its own body, not those it inherits."""
    if issubclass(cls, BaseModel):
        inherited = [base.model_fields for base in cls.__mro__[1:] if issubclass(base, BaseModel)]
        return set(cls.model_fields).difference(*inherited)
    if dataclasses.is_dataclass(cls):
        inherited_names = [
            {f.name for f in dataclasses.fields(base)}
            for base in cls.__mro__[1:]
            if dataclasses.is_dataclass(base)
        ]
        return {f.name for f in dataclasses.fields(cls)}.difference(*inherited_names)
    return set()


def _value_classes() -> Iterator[type]:
    """Every pydantic model and dataclass defined in MODULES."""
    for module in MODULES:
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and value.__module__ == module.__name__
                and (issubclass(value, BaseModel) or dataclasses.is_dataclass(value))
            ):
                yield value


def test_every_key_is_declared_once() -> None:
    """Each field of each runtime object is declared in exactly one class: no config object
    restates a section's keys (as ModalityRule, FaultPlan, DispatchLimits and EmulatorConfig
    once did), so a new key is one field and its default and rules are written once."""
    classes = list(_value_classes())
    assert ConvertOptions in classes and FaultPlan in classes  # the scan sees what it checks
    for runtime in RUNTIME:
        for key in runtime.model_fields:
            owners = [
                cls.__qualname__
                for cls in classes
                if key in _declared(cls)
                # another section's key of the same name is another setting (admin.port)
                and (cls in runtime.__mro__ or cls not in SECTIONS)
                # the result of a conversion names the object's Modality, not a setting
                and cls is not options.ConvertedImage
            ]
            assert len(owners) == 1, f"{runtime.__name__}.{key} is declared by {owners}"


def test_runtime_objects_are_their_sections() -> None:
    """A runtime object is its section or a subclass that only adds run-time fields, so a key
    added to a section reaches the code without another edit; constructors take the section,
    not its keys one by one."""
    for runtime, section in RUNTIME.items():
        assert issubclass(runtime, section)
    # [convert.modality.X] is derived from the keys it overrides: every one, optional, same rules
    assert ModalityRule.model_fields.keys() == ModalityChoices.model_fields.keys()
    assert all(field.default is None for field in ModalityRule.model_fields.values())
    assert not _declared(ModalityRule) and issubclass(ConvertSettings, ModalityChoices)
    with pytest.raises(ConfigError, match="frame_param"):
        ModalityRule(frame_param=0)
    # the endpoint client takes the section (and the secret, read from env or file)
    endpoint_parameters = inspect.signature(EndpointClient).parameters
    assert set(endpoint_parameters) & set(EndpointSettings.model_fields) == {"key"}
    assert "EndpointSettings" in str(endpoint_parameters["endpoint"].annotation)
    # the emulator takes its section (port 0 aside, for tests), the dispatcher its limits
    emulator_parameters = inspect.signature(EmulatorServer).parameters
    assert set(emulator_parameters) & set(EmulatorSettings.model_fields) == {"port"}
    assert "EmulatorSettings" in str(emulator_parameters["config"].annotation)
    assert not set(inspect.signature(Dispatcher).parameters) & set(QueueSettings.model_fields)


def test_sections_reach_the_runtime_objects_whole() -> None:
    """Every key of a section arrives in the object built from the settings, with its value."""
    settings = Settings.load(
        convert={"processes": 3, "frame_policy": "all"},
        queue={"batch_size": 8},
        detect={"body_part_aliases": {"BRUSTKORB": "CHEST"}},
        endpoint={"url": "http://127.0.0.1:9/score", "auth": "none", "max_attempts": 2},
    )
    convert = ConvertOptions.from_settings(settings)
    assert {k: getattr(convert, k) for k in ConvertSettings.model_fields} == dict(settings.convert)
    assert convert.body_part_aliases == {"BRUSTKORB": "CHEST"}
    limits = DispatchLimits.from_settings(settings)
    assert {k: getattr(limits, k) for k in QueueSettings.model_fields} == dict(settings.queue)
    assert limits.in_flight == 2 * 3
    with compose.build_client(settings) as endpoint:
        assert endpoint._endpoint is settings.endpoint


def test_sections_refuse_bad_values_by_name_when_built_directly() -> None:
    """Built outside Settings.load, a section still names the key it refuses."""
    with pytest.raises(ConfigError, match=r"^queue\.batch_size: "):
        QueueSettings(batch_size=0)
    with pytest.raises(ConfigError, match=r"^convert\.percentiles: "):
        ConvertOptions(percentiles=(99.0, 1.0))
    with pytest.raises(ConfigError, match=r"^endpoint\.no_such_key: "):
        EndpointSettings(no_such_key=1)


def test_sections_are_hashable_and_pickle() -> None:
    """Frozen values: the conversion options are a cache key and travel to the process pool."""
    import pickle

    options = ConvertOptions(modality={"CT": ModalityRule(preset_window=(40, 400))})
    assert pickle.loads(pickle.dumps(options)) == options  # noqa: S301 - our own bytes
    assert hash(options) == hash(ConvertOptions(modality={"ct": {"preset_window": [40, 400]}}))
