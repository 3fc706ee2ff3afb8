"""The command line for people: `status` as a summary (``--json`` the document), `check-config`
with secrets masked, progress of long commands on a terminal only."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import redis

from pacs_embed import summary
from pacs_embed.progress import Progress
from pipeline import health
from pipeline.ledger import Ledger, Stage
from pipeline.records import ImageRecord
from pipeline.store import EmbeddingStore
from pipeline.studies import Studies
from tests.test_cli import cli


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_EMBED_")}
    return {**env, **extra}


# -- status ------------------------------------------------------------------------------------

STUDY = "1.2.826.0.1.3680043.10.99.1"


def test_status_prints_a_summary_and_json_the_document(
    redis_conn: redis.Redis, redis_server: str, tmp_path: Path
) -> None:
    """Counts by state, a busy worker with its job, a failing dispatcher, a recent study and a
    failure with its reason, in text; ``--json`` is the document as /status has it."""
    ledger = Ledger(redis_conn)
    ledger.spooled(["1.2.3.1", "1.2.3.2", "1.2.3.3"])
    ledger.converting(["1.2.3.2", "1.2.3.3"])
    ledger.failed("1.2.3.2", Stage.CONVERT, "unsupported Bits Allocated 7", "decoder said no")
    ledger.skipped("1.2.3.3", "not an image to embed: Modality SEG")
    Studies(redis_conn).arrived([(STUDY, "1.2.3.1")])
    since = time.time() - 3700
    health.publish(redis_conn, health.WORKER, {"state": "busy", "job": "job-42", "since": since})
    health.publish(
        redis_conn,
        health.DISPATCHER,
        {"ok": False, "failing_for_seconds": 12.5, "last_error": "TimeoutError", "backlog": 4},
    )
    env = clean_env(
        PACS_EMBED_REDIS__URL=redis_server, PACS_EMBED_STATE_DIR=str(tmp_path / "state")
    )
    text = cli("status", env=env)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert not out.lstrip().startswith("{")
    assert "up 1h 01m" in out
    assert "instances   3 received: spooled 1" in out and "failed 1" in out and "skipped 1" in out
    assert "queue       embed:" in out and "queue       push:" in out
    assert "workers     1 alive" in out and "busy  job job-42" in out
    dispatcher = f"dispatcher  {health.process_name()}: FAILING for 12.5 s (TimeoutError)"
    assert f"{dispatcher}, backlog 4" in out
    assert "sinks       pending 0, dead-lettered 0" in out
    assert f"  {STUDY}  v1  open  0/1 final  pushed nowhere" in out
    assert "1.2.3.2  convert: unsupported Bits Allocated 7" in out
    assert "decoder said no" not in out  # the detail stays in the document
    document = cli("status", "--json", env=env)
    assert document.returncode == 0, document.stderr
    doc = json.loads(document.stdout)
    assert doc["instances"]["received"] == 3 and doc["failures"][0]["detail"] == "decoder said no"


def test_summary_of_a_partial_document() -> None:
    """A document without some sections (another version's) still renders, without them."""
    assert summary.render({}) == "pacs-embed ?, no component up\n"
    text = summary.render({"version": "1.0", "uptime_seconds": 5, "failures": []})
    assert text == "pacs-embed 1.0, up 5s\nfailures    none\n"


# -- check-config ------------------------------------------------------------------------------


def test_check_config_prints_the_effective_settings(tmp_path: Path) -> None:
    """Exit 0 and TOML: the file's values over the defaults, env over the file, secret files
    named but not read (this one does not even exist)."""
    config = tmp_path / "pacs.toml"
    config.write_text(
        '[listener]\nport = 11113\nae_title = "FILE_AE"\n'
        '[endpoint]\nurl = "https://ml.example/score"\nkey_file = "/nonexistent/endpoint.key"\n'
        '[convert.modality.CT]\nwindow_explanation = "LUNG"\n'
    )
    done = cli("check-config", str(config), env=clean_env(PACS_EMBED_LISTENER__AE_TITLE="ENV_AE"))
    assert done.returncode == 0, done.stderr
    settings = tomllib.loads(done.stdout)
    assert settings["listener"]["port"] == 11113 and settings["listener"]["ae_title"] == "ENV_AE"
    assert settings["endpoint"]["key_file"] == "/nonexistent/endpoint.key"
    assert "key" not in settings["endpoint"] and "# key: unset" in done.stdout
    assert settings["convert"]["modality"]["CT"]["window_explanation"] == "LUNG"
    assert settings["detect"]["label_prompts"]["XR/CHEST"] == "x-ray chest posteroanterior"
    assert settings["queue"]["batch_size"] == 16  # a default
    as_json = cli("--config", str(config), "check-config", "--json", env=clean_env())
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["listener"]["ae_title"] == "FILE_AE"


def test_check_config_names_the_invalid_key(tmp_path: Path) -> None:
    """Exit 2, the ConfigError lines on stderr naming each bad key, nothing on stdout."""
    config = tmp_path / "bad.toml"
    config.write_text('[listener]\nport = "not-a-port"\n[queue]\nbatch_size = 0\n')
    done = cli("check-config", str(config), env=clean_env())
    assert done.returncode == 2 and done.stdout == ""
    assert "listener.port" in done.stderr and "queue.batch_size" in done.stderr
    assert "Traceback" not in done.stderr
    secret = tmp_path / "secret.toml"
    secret.write_text('[admin]\ntoken = "in-the-file"\n')
    done = cli("check-config", str(secret), env=clean_env())
    assert done.returncode == 2 and "[admin] token is a secret" in done.stderr
    assert "in-the-file" not in done.stderr
    keyless = cli(
        "check-config", env=clean_env(PACS_EMBED_ENDPOINT__URL="https://ml.example/score")
    )
    assert keyless.returncode == 2 and "endpoint.auth" in keyless.stderr


def test_check_config_masks_every_secret() -> None:
    """Secrets set in the environment are printed as *** (TOML and JSON), a Redis URL's
    password too; none of their values appears anywhere in the output."""
    secrets = {
        "PACS_EMBED_ENDPOINT__KEY": "endpoint-key-5c1e7",
        "PACS_EMBED_ADMIN__TOKEN": "admin-token-9a2f4",
        "PACS_EMBED_EMULATOR__KEY": "emulator-key-33b0d",
        "PACS_EMBED_SINKS__DICOMWEB__TOKEN": "dicomweb-token-7e6a1",
        "PACS_EMBED_SINKS__DICOMWEB__PASSWORD": "dicomweb-password-0d9c2",
        "PACS_EMBED_SINKS__WEBHOOK__SECRET": "webhook-secret-48f1a",
    }
    env = clean_env(
        **secrets,
        PACS_EMBED_ENDPOINT__URL="https://ml.example/score",
        PACS_EMBED_SINKS__DICOMWEB__URL="https://pacs.example/dicom-web",
        PACS_EMBED_SINKS__DICOMWEB__AUTH="bearer",
        PACS_EMBED_SINKS__WEBHOOK__URL="https://hooks.example/in",
        PACS_EMBED_REDIS__URL="redis://:redis-password-e2b71@10.0.0.5:6379/0",
    )
    values = [*secrets.values(), "redis-password-e2b71"]
    for args in (("check-config",), ("check-config", "--json")):
        done = cli(*args, env=env)
        assert done.returncode == 0, done.stderr
        leaked = [v for v in values if v in done.stdout + done.stderr]
        assert not leaked, leaked
        settings = json.loads(done.stdout) if "--json" in args else tomllib.loads(done.stdout)
        sinks = settings["sinks"]
        shown = [
            settings["endpoint"]["key"],
            settings["admin"]["token"],
            settings["emulator"]["key"],
            sinks["dicomweb"]["token"],
            sinks["dicomweb"]["password"],
            sinks["webhook"]["secret"],
        ]
        assert shown == ["***"] * 6
        assert settings["redis"]["url"] == "redis://:***@10.0.0.5:6379/0"


# -- progress ----------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only() -> None:
    clock = [0.0]
    tty = Terminal()
    with Progress("rows", 10, stream=tty, clock=lambda: clock[0]) as progress:
        progress.update(1)
        progress.update(2)  # within the interval: not drawn
        clock[0] = 1.0
        progress.update(5)
    assert tty.getvalue() == "\rrows: 1/10 (10%)\rrows: 5/10 (50%)\rrows: 5/10 (50%)\n"
    piped = io.StringIO()
    with Progress("rows", 10, stream=piped) as progress:
        progress.update(10)
    assert piped.getvalue() == ""


def test_export_shows_progress_on_a_terminal_not_in_a_pipe(
    redis_conn: redis.Redis, redis_server: str, tmp_path: Path
) -> None:
    """`embeddings export` and `reference export` draw their progress on stderr when it is a
    terminal (a pseudo-terminal here), and write nothing there when it is a pipe."""
    store = EmbeddingStore(redis_conn, Ledger(redis_conn))
    images = [
        ImageRecord(
            sop_instance_uid=f"1.2.5.{n}", study_instance_uid="1.2", series_instance_uid="1.2.1"
        )
        for n in range(30)
    ]
    vectors = np.random.default_rng(0).normal(size=(30, 1024))
    store.save(images, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    env = clean_env(
        PACS_EMBED_REDIS__URL=redis_server, PACS_EMBED_STATE_DIR=str(tmp_path / "state")
    )
    export = ("embeddings", "export", "--out", str(tmp_path / "e.npz"))
    stdout, stderr = on_a_terminal(export, env)
    assert "exported 30 embeddings" in stdout
    assert "export: records: 30/30 (100%)" in stderr and "\r" in stderr
    stdout, stderr = on_a_terminal(("reference", "export", "--out", str(tmp_path / "r.npz")), env)
    assert "exported 0 reference vectors" in stdout and f"writing {tmp_path}" in stderr
    piped = cli(*export, env=env)
    assert piped.returncode == 0 and "exported 30 embeddings" in piped.stdout
    assert "export:" not in piped.stderr and "\r" not in piped.stderr


def on_a_terminal(args: tuple[str, ...], env: dict[str, str]) -> tuple[str, str]:
    """Run the command with stderr on a pseudo-terminal; (stdout, what the terminal got)."""
    master, slave = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "pacs_embed", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
    ) as proc:
        os.close(slave)
        got = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            got += chunk
        os.close(master)
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        assert proc.wait(60) == 0, got.decode(errors="replace")
    return stdout, got.decode(errors="replace")
