"""The composition root: each object built once per process; `run`'s overrides reach it and its
children alike; the local emulator's endpoint and label-check flag decided in one place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from pacs_embed.compose import Root, child_env, local_emulator, with_local_endpoint
from pipeline.settings import Settings
from tests.conftest import free_port
from tests.test_admin import DOCUMENTED


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PACS_EMBED_"):
            monkeypatch.delenv(name)


def test_a_root_builds_each_object_once(redis_conn: redis.Redis, tmp_path: Path) -> None:
    """One ledger, one store, one set of admin routes over them, however often asked for."""
    address = {"host": "127.0.0.1", "port": free_port(), "token": "t"}
    root = Root(Settings.load(state_dir=tmp_path, admin=address), redis_conn)
    assert root.redis is redis_conn
    assert root.ledger is root.ledger and root.store is root.store
    assert root.store.ledger is root.ledger
    state = root.admin_state
    assert (state.ledger, state.intake, state.store) == (root.ledger, root.intake, root.store)
    admin = root.admin
    admin.start_in_thread()
    try:
        assert root.admin is admin
        assert set(admin.routes) == DOCUMENTED  # the table the README and the tests name
        assert sorted(path for path, route in admin.routes.items() if not route.token) == [
            "/",
            "/healthz",
        ]  # the page's shell holds no data: it fetches everything with the token
    finally:
        admin.shutdown()


def test_a_root_closes_the_client_it_opened(redis_conn: redis.Redis) -> None:
    """The endpoint client's HTTP pool ends with the root's ``with`` block."""
    settings = Settings.load(endpoint={"url": "http://127.0.0.1:9/score", "auth": "none"})
    with Root(settings, redis_conn) as root:
        http: httpx.Client = root.client._http
        assert root.client is root.client and not http.is_closed
    assert http.is_closed


def test_runs_overrides_reach_its_children_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` loads its own settings from the overrides and hands its children the same overrides
    as env vars: both end up with the same settings, label check off with the emulator."""
    before = Settings.load(state_dir=tmp_path)
    overrides: dict[str, Any] = {
        "state_dir": tmp_path,
        "redis": {"url": "unix:///tmp/redis.sock"},
        **local_emulator(before),
    }
    in_run = Settings.load(**overrides)
    for name, value in child_env(overrides).items():
        monkeypatch.setenv(name, value)
    in_child = Settings.load()
    assert in_child.model_dump() == in_run.model_dump()
    assert in_child.detect.label_check is False
    assert in_child.endpoint.url == "http://127.0.0.1:8765/score"
    assert (
        in_child.endpoint.key_file
        == in_child.emulator.key_file
        == tmp_path / "secrets" / ("endpoint.key")
    )


def test_one_shot_commands_find_runs_emulator_where_run_put_it(tmp_path: Path) -> None:
    """`search --file` without an endpoint uses the endpoint `run`'s workers use."""
    settings = Settings.load(state_dir=tmp_path)
    overrides: dict[str, Any] = {"state_dir": tmp_path, **local_emulator(settings)}
    assert with_local_endpoint(settings).endpoint == Settings.load(**overrides).endpoint
    configured = Settings.load(endpoint={"url": "https://x.inference.ml.azure.com/score"})
    assert with_local_endpoint(configured) is configured
    assert local_emulator(configured)["detect"] == {"label_check": False}
