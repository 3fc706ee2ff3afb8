"""Scale-out: two listener hosts and three workers as separate processes sharing one Redis.

Each "listener host" has its own state dir and runs `dispatch`, `listen`, `push` and `admin` on
it, as the Deploying section lays them out; three `worker`s and one `emulator` (the endpoint)
complete the fleet. One study goes to each listener at once; every instance must be embedded
exactly once, each worker must have taken part, each study must be pushed once, by its own
host's push service, and both admins must report the same fleet-wide status.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests import factory
from tests.conftest import free_port
from tests.daemon import WebhookBodies, echo, get_json, storescu, successes
from tests.sinks_peers import HTTPReceiver

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("storescu") is None or shutil.which("echoscu") is None,
        reason="DCMTK not installed",
    ),
]

SLICES = 12  # per study; with batch_size 4 at least 6 embed jobs for three workers
TOKEN = "t"  # noqa: S105 - a test token

#: The /status fields that describe the shared Redis, hence the whole fleet: the same from every
#: admin. The rest is per host or per moment (spool free space and quarantine: this host's disk;
#: uptime, throughput, workers' and pushers' heartbeats, the endpoint's in-flight leases: change
#: from one read to the next), so it is not compared.
FLEET_WIDE = ("instances", "counters", "queues", "studies")


class Fleet:
    """Processes started as ``python -m pacs_embed <role>``, each in its own process group."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, role: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pacs_embed", role],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def log_lines(self, name: str) -> list[dict[str, Any]]:
        lines = []
        for raw in (self.logs / f"{name}.log").read_text(errors="replace").splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                lines.append(line)
        return lines

    def tails(self, n: int = 15) -> str:
        parts = []
        for name in self.procs:
            text = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
            parts.append(f"--- {name} ---\n" + "\n".join(text[-n:]))
        return "\n".join(parts)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"processes exited early: {dead}\n{self.tails()}")

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.tails()}")
            time.sleep(0.2)

    def stop(self, grace: float = 20.0) -> list[str]:
        """SIGTERM to every group, then SIGKILL to those still running after ``grace`` seconds;
        returns the names that needed SIGKILL."""
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        killed = []
        for name, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(name)
                _signal_group(proc, signal.SIGKILL)
                proc.wait(10)
        for proc in self.procs.values():  # leftovers of a group whose leader is gone
            _signal_group(proc, signal.SIGKILL)
        return killed


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the leader's pid
    except ProcessLookupError:
        pass


@pytest.fixture
def webhooks() -> Iterator[tuple[WebhookBodies, str]]:
    hooks = WebhookBodies()
    with HTTPReceiver(hooks.answer) as receiver:
        yield hooks, receiver.url


def write_study(directory: Path, study: str) -> list[Path]:
    directory.mkdir(parents=True)
    series = factory.new_uid()
    return [
        factory.write(
            factory.ct_slice(
                study_uid=study,
                series_uid=series,
                instance_number=i,
                rows=32,
                columns=32,
                seed=i,
            ),
            directory / f"{i}.dcm",
        )
        for i in range(1, SLICES + 1)
    ]


def test_two_listeners_three_workers_embed_each_instance_once_and_admins_agree(
    redis_server: str, webhooks: tuple[WebhookBodies, str], tmp_path: Path
) -> None:
    hooks, hook_url = webhooks
    redis.Redis.from_url(redis_server).flushdb()
    base = {**os.environ, "PACS_EMBED_REDIS__URL": redis_server}
    emulator_port = free_port()
    fleet = Fleet(tmp_path / "logs")
    hosts: dict[str, dict[str, int]] = {}
    try:
        fleet.start(
            "emulator",
            "emulator",
            {
                **base,
                "PACS_EMBED_EMULATOR__HOST": "127.0.0.1",
                "PACS_EMBED_EMULATOR__PORT": str(emulator_port),
                "PACS_EMBED_EMULATOR__KEY": "k",
            },
        )
        for host in ("a", "b"):
            dicom_port, admin_port = free_port(), free_port()
            hosts[host] = {"dicom": dicom_port, "admin": admin_port}
            host_env = {
                **base,
                "PACS_EMBED_STATE_DIR": str(tmp_path / host),
                "PACS_EMBED_LISTENER__HOST": "127.0.0.1",
                "PACS_EMBED_LISTENER__PORT": str(dicom_port),
                "PACS_EMBED_LISTENER__MIN_FREE_DISK_MB": "16",
                "PACS_EMBED_QUEUE__LINGER_SECONDS": "0.3",
                "PACS_EMBED_QUEUE__BATCH_SIZE": "4",
                "PACS_EMBED_STUDY__STABLE_SECONDS": "1",
                "PACS_EMBED_SINKS__WEBHOOK__URL": hook_url,
                "PACS_EMBED_SINKS__WEBHOOK__SECRET": "s",
                "PACS_EMBED_ADMIN__HOST": "127.0.0.1",
                "PACS_EMBED_ADMIN__PORT": str(admin_port),
                "PACS_EMBED_ADMIN__TOKEN": TOKEN,
            }
            for role in ("dispatch", "listen", "push", "admin"):
                fleet.start(f"{role}-{host}", role, host_env)
        workers = [f"worker-{i}" for i in range(1, 4)]
        worker_env = {
            **base,
            "PACS_EMBED_STATE_DIR": str(tmp_path / "w"),
            "PACS_EMBED_ENDPOINT__URL": f"http://127.0.0.1:{emulator_port}/score",
            "PACS_EMBED_ENDPOINT__KEY": "k",
            "PACS_EMBED_DETECT__LABEL_CHECK": "false",
        }
        for name in workers:
            fleet.start(name, "worker", worker_env)

        # ready: by conditions, not by sleeping (a bare TCP connect to a listener would count
        # as a rejected association, so listeners are probed with C-ECHO)
        fleet.wait_for(lambda: get_json(emulator_port, "/healthz") is not None, 30, "emulator")
        for host, ports in hosts.items():
            fleet.wait_for(
                lambda p=ports["admin"]: get_json(p, "/healthz") is not None,  # type: ignore[misc]
                30,
                f"admin {host} /healthz",
            )
            fleet.wait_for(
                lambda p=ports["dicom"]: echo(p) == 0,  # type: ignore[misc]
                30,
                f"listener {host} C-ECHO",
            )
        health = redis.Redis.from_url(redis_server)
        fleet.wait_for(
            lambda: len(list(health.scan_iter("pe:health:worker:*"))) >= 3, 30, "3 workers' health"
        )

        studies = {"a": factory.new_uid(), "b": factory.new_uid()}
        files = {h: write_study(tmp_path / f"study-{h}", uid) for h, uid in studies.items()}
        sent: dict[str, subprocess.CompletedProcess[str]] = {}

        def send(host: str) -> None:
            sent[host] = storescu(hosts[host]["dicom"], files[host])

        threads = [threading.Thread(target=send, args=(h,)) for h in hosts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for host in hosts:
            assert successes(sent[host]) == SLICES, sent[host].stdout + sent[host].stderr

        total = SLICES * len(studies)

        def status(host: str) -> dict[str, Any] | None:
            return get_json(hosts[host]["admin"], "/status", TOKEN)

        def embedded(host: str) -> int:
            doc = status(host)
            return -1 if doc is None else int(doc["instances"].get("embedded", 0))

        for host in hosts:
            fleet.wait_for(lambda h=host: embedded(h) == total, 45, f"{total} embedded ({host})")  # type: ignore[misc]

        def all_pushed() -> bool:
            if any(hooks.versions(uid) != [1] for uid in studies.values()):
                return False
            doc = status("a")
            recent = (
                {}
                if doc is None
                else {s["study_instance_uid"]: s for s in doc["studies"]["recent"]}
            )
            return all(
                uid in recent and recent[uid]["pushed"] == {"webhook": 1}
                for uid in studies.values()
            )

        fleet.wait_for(all_pushed, 30, "each study's webhook, version 1")
        time.sleep(1.5)  # room for a second (wrong) delivery to show up

        # both admins agree on everything fleet-wide; two reads are not atomic, so retry a little
        docs: dict[str, dict[str, Any]] = {}

        def agree() -> bool:
            for host in hosts:
                doc = status(host)
                if doc is None:
                    return False
                docs[host] = {field: doc[field] for field in FLEET_WIDE}
            return docs["a"] == docs["b"]

        deadline = time.monotonic() + 10
        while not agree() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert docs["a"] == docs["b"], json.dumps(docs, indent=1, sort_keys=True)

        doc = docs["a"]
        assert doc["instances"].get("embedded") == total, doc["instances"]
        assert doc["counters"].get("embedded") == total, doc["counters"]  # no double commit
        recent = {s["study_instance_uid"]: s for s in doc["studies"]["recent"]}
        for uid in studies.values():
            assert recent[uid]["pushed"] == {"webhook": 1}, recent[uid]
            assert hooks.versions(uid) == [1], hooks.got  # exactly once, by one push service

        for host, uid in studies.items():  # each host's push service pushed its own study
            pushed_by = {
                h: [
                    line
                    for line in fleet.log_lines(f"push-{h}")
                    if line.get("event") == "push.sent" and line.get("study_instance_uid") == uid
                ]
                for h in hosts
            }
            assert [h for h, lines in pushed_by.items() if lines] == [host], pushed_by

        jobs = {
            name: sum(1 for line in fleet.log_lines(name) if line.get("event") == "embed.done")
            for name in workers
        }
        assert all(n >= 1 for n in jobs.values()), jobs
        done = [
            line
            for name in workers
            for line in fleet.log_lines(name)
            if line.get("event") == "embed.done"
        ]
        assert sum(int(line.get("embedded", 0)) for line in done) == total, done

        killed = fleet.stop()
        assert killed == [], f"needed SIGKILL: {killed}\n{fleet.tails()}"
        assert all(p.poll() is not None for p in fleet.procs.values())
    finally:
        fleet.stop()
