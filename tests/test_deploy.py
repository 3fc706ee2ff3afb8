"""Deployment files: the Dockerfile (hadolint, its shape), compose.yaml (roles, shared spool,
durable Redis, secrets only as files), the systemd units (systemd-analyze verify), and a managed
Redis reached by rediss:// and a password URL.

No image is built here: CI may have no Docker daemon (README "Deploying" has the manual smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from pipeline.settings import Settings
from tests.conftest import free_port
from tests.sinks_peers import Certificates, make_certificates

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
SYSTEMD = ROOT / "deploy" / "systemd"
BIN = Path(sys.executable).parent
STATE_DIR = "/var/lib/pacs-embed"
ROLES = {"redis", "listener", "dispatcher", "push", "worker", "admin", "emulator"}


def _subcommands() -> set[str]:
    from pacs_embed.cli import _parser

    parser = _parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def _tool(name: str) -> str:
    """A dev-extra tool: beside this interpreter (the .venv), else on PATH."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: pip install -e '.[dev]' (make test installs it)")
    return found


# -- Dockerfile --------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def test_dockerfile_passes_hadolint_without_a_warning() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    ins = _instructions()
    bases = [args for word, args in ins if word == "FROM"]
    assert len(bases) >= 2
    assert all(b.split()[0] == "python:3.11-slim-bookworm" for b in bases)
    final = _final_stage()
    final_text = " ".join(args for _, args in final)
    assert "COPY --from=build /opt/pacs-embed /opt/pacs-embed" in {f"COPY {a}" for w, a in final}
    for tool in ("gcc", "build-essential", "g++", "make ", "-dev ", "curl", "wget"):
        assert tool not in final_text, f"{tool!r} in the runtime image"
    assert "redis-server" in final_text  # `run` starts its private Redis in the one container
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    env = " ".join(args for word, args in final if word == "ENV")
    assert f"PACS_EMBED_STATE_DIR={STATE_DIR}" in env
    assert json.loads(dict(final)["VOLUME"]) == [STATE_DIR]
    assert set(dict(final)["EXPOSE"].split()) == {"11112", "2762", "8080"}
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["pacs-embed"]
    assert json.loads(dict(final)["CMD"]) == ["run"]
    assert "/healthz" in dict(final)["HEALTHCHECK"]


def test_the_image_holds_every_package_the_wheel_has() -> None:
    """A new top-level package in pyproject.toml must be copied into the build stage too."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    copied = {
        source
        for word, args in _instructions()
        if word == "COPY"
        for source in args.split()[:-1]
        if not source.startswith("--")
    }
    assert packages | {"pyproject.toml", "README.md"} <= copied
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not (packages | {"pyproject.toml", "README.md"}) & ignored


def _healthcheck_command() -> list[str]:
    args = dict(_final_stage())["HEALTHCHECK"]
    command: list[str] = json.loads(args[args.index("CMD") + len("CMD") :].strip())
    return command


@pytest.fixture
def admin_process(
    tmp_path: Path, redis_server: str
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    """`pacs-embed admin` on a free port; yields it and the environment it runs with."""
    env = {
        **_clean_env(),
        "PACS_EMBED_STATE_DIR": str(tmp_path / "state"),
        "PACS_EMBED_REDIS__URL": redis_server,
        "PACS_EMBED_ADMIN__PORT": str(free_port()),
    }
    proc = subprocess.Popen([str(BIN / "pacs-embed"), "admin"], env=env)
    try:
        yield proc, env
    finally:
        proc.terminate()
        proc.wait(15)


def test_the_image_healthcheck_probes_the_admin_healthz(
    admin_process: tuple[subprocess.Popen[bytes], dict[str, str]],
) -> None:
    """The HEALTHCHECK's own command, run as Docker runs it (python = the image's venv)."""
    proc, env = admin_process
    command = _healthcheck_command()
    assert command[0] == "python"
    command[0] = sys.executable
    deadline = time.monotonic() + 30
    while True:
        result = subprocess.run(command, env=env, capture_output=True, timeout=10)
        if result.returncode == 0:
            break
        assert proc.poll() is None, f"pacs-embed admin exited with status {proc.returncode}"
        assert time.monotonic() < deadline, result.stderr.decode()
        time.sleep(0.2)
    port = env["PACS_EMBED_ADMIN__PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
        assert answer.status == 200


# -- compose.yaml ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra")
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _volume_at(service: dict[str, Any], target: str) -> str | None:
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            if rest.split(":")[0] == target:
                return source
        elif volume.get("target") == target:
            return str(volume.get("source"))
    return None


def test_compose_runs_every_role(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= ROLES
    commands = {name: s.get("command") for name, s in services.items() if name != "redis"}
    assert commands == {
        "listener": ["listen"],
        "dispatcher": ["dispatch"],
        "push": ["push"],
        "worker": ["worker"],
        "admin": ["admin"],
        "emulator": ["emulator"],
    }
    assert services["worker"]["deploy"]["replicas"] >= 2
    for name in commands:
        assert services[name]["image"] == services["listener"]["image"]  # one image, any role


def test_compose_commands_are_real_subcommands(compose: dict[str, Any]) -> None:
    real = _subcommands()
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        command = service["command"]
        assert command[0] in real, f"{name}: {command[0]} is no pacs-embed subcommand"


def test_listener_dispatcher_and_push_share_the_state_dir(compose: dict[str, Any]) -> None:
    services = compose["services"]
    listener = _volume_at(services["listener"], STATE_DIR)
    assert listener is not None
    assert listener in compose["volumes"]  # a named volume, not the container's own layer
    assert _volume_at(services["push"], STATE_DIR) == listener
    assert _volume_at(services["dispatcher"], STATE_DIR) == listener
    assert "11112:11112" in [str(p) for p in services["listener"]["ports"]]


def test_redis_is_durable_and_checked(compose: dict[str, Any]) -> None:
    redis_service = compose["services"]["redis"]
    assert str(redis_service["image"]).startswith("redis:7")
    command = redis_service["command"]
    command = command if isinstance(command, list) else command.split()
    assert command[command.index("--appendonly") + 1] == "yes"
    data = _volume_at(redis_service, "/data")
    assert data in compose["volumes"]
    assert "redis-cli" in " ".join(redis_service["healthcheck"]["test"])


def test_admin_has_its_port_and_healthcheck(compose: dict[str, Any]) -> None:
    admin = compose["services"]["admin"]
    assert any(str(p).endswith("8080:8080") for p in admin["ports"])
    test = " ".join(admin["healthcheck"]["test"])
    assert "/healthz" in test and "8080" in test
    assert not admin["healthcheck"].get("disable")


def test_the_listener_healthcheck_is_a_c_echo(
    compose: dict[str, Any], tmp_path: Path, redis_server: str
) -> None:
    """compose's listener check, run against a real `pacs-embed listen` (a bare TCP connect would
    be logged and counted as a refused association every time)."""
    test = compose["services"]["listener"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    env = {
        **_clean_env(),
        "PACS_EMBED_STATE_DIR": str(tmp_path / "state"),
        "PACS_EMBED_REDIS__URL": redis_server,
        "PACS_EMBED_LISTENER__PORT": str(free_port()),
    }
    proc = subprocess.Popen([str(BIN / "pacs-embed"), "listen"], env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            result = subprocess.run([sys.executable, *test[2:]], env=env, capture_output=True)
            if result.returncode == 0:
                break
            assert proc.poll() is None, f"pacs-embed listen exited with status {proc.returncode}"
            assert time.monotonic() < deadline, result.stderr.decode()
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(30)


_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def test_no_secret_is_inline(compose: dict[str, Any]) -> None:
    defined = set(compose.get("secrets", {}))
    for secret in compose.get("secrets", {}).values():
        assert set(secret) == {"file"}, "secrets come from files"
    for name, service in compose["services"].items():
        mounted = {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}
        assert mounted <= defined
        for key, value in _environment(service).items():
            assert "@" not in value.split("//", 1)[-1].split("/")[0], (
                f"{name}: {key} has a password"
            )
            if any(word in key.upper() for word in _SECRET_WORDS):
                assert key.endswith("_FILE") or value.startswith("/run/secrets/"), (name, key)
                if value.startswith("/run/secrets/"):
                    assert value.removeprefix("/run/secrets/") in mounted, (name, key)


def _setting(path: list[str]) -> bool:
    """Whether PACS_EMBED_A__B names a real setting (case-insensitive, as pydantic-settings)."""
    model: type[BaseModel] = Settings
    for part in path:
        fields = {name.lower(): info for name, info in model.model_fields.items()}
        info = fields.get(part.lower())
        if info is None:
            return False
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            model = info.annotation
    return True


def test_compose_environment_names_real_settings(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        env = _environment(service)
        assert env["PACS_EMBED_STATE_DIR"] == STATE_DIR
        assert env["PACS_EMBED_REDIS__URL"] == "redis://redis:6379/0"
        for key in env:
            assert key.startswith("PACS_EMBED_"), (name, key)
            assert _setting(key.removeprefix("PACS_EMBED_").split("__")), (name, key)
    services = compose["services"]
    assert _environment(services["worker"])["PACS_EMBED_ENDPOINT__URL"] == (
        "http://emulator:8765/score"
    )
    for name, key in [
        ("admin", "PACS_EMBED_ADMIN__HOST"),
        ("emulator", "PACS_EMBED_EMULATOR__HOST"),
        ("listener", "PACS_EMBED_LISTENER__HOST"),
    ]:
        assert _environment(services[name])[key] == "0.0.0.0"
    # the key the emulator checks is the one the workers send
    assert (
        _environment(services["worker"])["PACS_EMBED_ENDPOINT__KEY_FILE"]
        == _environment(services["emulator"])["PACS_EMBED_EMULATOR__KEY_FILE"]
    )
    assert _environment(services["admin"])["PACS_EMBED_ADMIN__TOKEN_FILE"].startswith(
        "/run/secrets/"
    )


# -- systemd -----------------------------------------------------------------------------------

UNITS = ["pacs-embed.service", "pacs-embed-worker@.service"]


def _unit(name: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (sections merged: the keys here do not repeat across them)."""
    values: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` needs ExecStart's binary: the units are checked with the venv's
    pacs-embed in place of /opt/pacs-embed/bin/pacs-embed, everything else as shipped. It exits 0
    on unknown keys and bad values too (only printing them), so any line naming a unit fails."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd; make test installs it)")
    rendered = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert "ExecStart=/opt/pacs-embed/bin/pacs-embed " in text
        path = tmp_path / name
        path.write_text(text.replace("/opt/pacs-embed/bin/pacs-embed", str(BIN / "pacs-embed")))
        rendered.append(str(path))
    result = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", *rendered],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    ours = [line for line in output.splitlines() if "pacs-embed" in line]
    assert (result.returncode, ours) == (0, []), output


def test_systemd_service_runs_unprivileged_and_stops_gracefully() -> None:
    for name in UNITS:
        unit = _unit(name)
        assert unit["User"] == ["pacs-embed"]
        assert unit["StateDirectory"] == ["pacs-embed"]
        assert f"PACS_EMBED_STATE_DIR={STATE_DIR}" in unit["Environment"]
        assert unit["EnvironmentFile"] == ["-/etc/pacs-embed/env"]
        assert unit["Restart"] == ["on-failure"]
        assert unit["KillSignal"] == ["SIGTERM"]
        assert int(unit["TimeoutStopSec"][0].removesuffix("s")) >= 120
        assert unit["NoNewPrivileges"] == ["yes"]
        assert unit["ProtectSystem"] == ["strict"]
        assert unit["ReadWritePaths"] == [STATE_DIR]
        assert unit["PrivateTmp"] == ["yes"]
        assert unit["StandardOutput"] == ["journal"]
        command = unit["ExecStart"][0].split()
        assert command[1] in _subcommands()
    assert _unit("pacs-embed.service")["ExecStart"] == ["/opt/pacs-embed/bin/pacs-embed run"]
    # SIGTERM to `run` alone: it stops its children in order (Redis last), not all at once
    assert _unit("pacs-embed.service")["KillMode"] == ["mixed"]
    sysusers = [
        line.split()
        for line in (SYSTEMD / "pacs-embed.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sysusers[0][:3] == ["u", "pacs-embed", "-"]


# -- a managed Redis: TLS and a password -------------------------------------------------------


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PACS_EMBED_")}


@contextlib.contextmanager
def _redis(tmp_path: Path, *args: str) -> Iterator[None]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), *args],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "certs")


@pytest.fixture
def tls_redis(tmp_path: Path, certificates: Certificates) -> Iterator[int]:
    """redis-server speaking only TLS (no client certificate asked) and wanting a password."""
    port = free_port()
    with _redis(
        tmp_path,
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(certificates.server_cert),
        "--tls-key-file", str(certificates.server_key),
        "--tls-ca-cert-file", str(certificates.ca),
        "--tls-auth-clients", "no",
        "--requirepass", "s3cret pass",
    ):  # fmt: skip
        yield port


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    with _redis(tmp_path, "--port", str(port), "--requirepass", "pw"):
        yield port


def _status(tmp_path: Path, url: str) -> subprocess.CompletedProcess[str]:
    """`pacs-embed status` against ``url`` once the server answers (it may still be starting)."""
    env = {
        **_clean_env(),
        "PACS_EMBED_STATE_DIR": str(tmp_path / "state"),
        "PACS_EMBED_REDIS__URL": url,
    }
    port = int(url.split("@127.0.0.1:")[1].split("/")[0])
    deadline = time.monotonic() + 10
    while True:  # until redis-server accepts connections
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    return subprocess.run(
        [str(BIN / "pacs-embed"), "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_over_rediss_with_a_password(
    tmp_path: Path, tls_redis: int, certificates: Certificates
) -> None:
    """A managed Redis: TLS, the server's certificate checked against a private CA given in the
    URL (redis-py's ssl_ca_certs query parameter), a password with a space (URL-encoded)."""
    url = f"rediss://:s3cret%20pass@127.0.0.1:{tls_redis}/0?ssl_ca_certs={certificates.ca}"
    result = _status(tmp_path, url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["instances"]["received"] == 0


def test_rediss_checks_the_server_certificate(tmp_path: Path, tls_redis: int) -> None:
    """Without the CA (the system CAs do not know ours) the connection is refused."""
    result = _status(tmp_path, f"rediss://:s3cret%20pass@127.0.0.1:{tls_redis}/0")
    assert result.returncode != 0
    assert "certificate verify failed" in result.stderr.lower()


def test_status_with_a_password_url(tmp_path: Path, password_redis: int) -> None:
    result = _status(tmp_path, f"redis://:pw@127.0.0.1:{password_redis}/0")
    assert result.returncode == 0, result.stderr
    assert "instances" in json.loads(result.stdout)
    wrong = _status(tmp_path, f"redis://:not-the-pw-7f3a@127.0.0.1:{password_redis}/0")
    assert wrong.returncode != 0
    assert "not-the-pw-7f3a" not in wrong.stderr + wrong.stdout  # never echoed
