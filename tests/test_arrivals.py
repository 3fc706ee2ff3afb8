"""The hand-off from listener processes to their node's dispatcher (dicom_listener/arrivals.py),
several listener processes on one port, and reconciliation that skips what is on its way."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import redis

from dicom_listener import arrivals
from dicom_listener.arrivals import ArrivalLog
from dicom_listener.reconcile import reconcile
from dicom_listener.server import Listener
from dicom_listener.spool import Spool
from pipeline.keys import arrivals_key
from pipeline.ledger import Ledger
from tests import factory
from tests.conftest import free_port
from tests.daemon import Daemon, children, storescu, successes, wait_for
from tests.test_listener_slots import make_listener, starting


def start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    assert shutil.which("redis-server")
    return subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--dir", str(directory)),
        ],
        stdout=subprocess.DEVNULL,
    )


def test_arrivals_wait_out_a_redis_outage_in_order(tmp_path: Path) -> None:
    """Spooled instances added while Redis is away are kept (and counted as backlog, which
    the back-pressure reads) and written, oldest first, once it answers."""
    port = free_port()
    connection = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    log = ArrivalLog(connection, "n1")
    log.start()
    server = None
    try:
        uids = [f"1.2.3.{i}" for i in range(5)]
        for uid in uids:
            log.add(uid)
        assert log.backlog() == 5
        server = start_redis(port, tmp_path)
        wait_for(lambda: connection.llen(arrivals_key("n1")) == 5, 30, "the arrivals written")
        assert arrivals.take(connection, "n1", 100) == (uids, True)
        wait_for(lambda: log.backlog() == 0, 10, "the backlog refreshed")
    finally:
        log.stop()
        connection.close()
        if server is not None:
            server.terminate()
            server.wait(10)


def test_a_starting_listener_asks_for_one_reconciliation(redis_conn: redis.Redis) -> None:
    """A listener process's first write asks its node's dispatcher to reconcile the spool
    (what a predecessor held in memory is only there); the request is taken once."""
    log = ArrivalLog(redis_conn, "n1")
    log.start()
    try:
        wait_for(lambda: arrivals.take(redis_conn, "n1", 10)[1], 10, "the request")
        log.add("1.2.3.4")
        wait_for(lambda: redis_conn.llen(arrivals_key("n1")) == 1, 10, "the arrival")
        assert arrivals.take(redis_conn, "n1", 10) == (["1.2.3.4"], False)
    finally:
        log.stop()


def test_reconcile_skips_what_is_on_its_way(tmp_path: Path, redis_conn: redis.Redis) -> None:
    """Instances the dispatcher holds or that are still on the arrival log are not submitted a
    second time: each would be converted twice."""
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    series = factory.ct_series(3, rows=16, columns=16)
    for i, ds in enumerate(series):
        spool.write(ds.SOPInstanceUID, factory.write(ds, tmp_path / f"{i}.dcm").read_bytes())
    uids = [str(ds.SOPInstanceUID) for ds in series]
    submitted: list[Path] = []
    counts = reconcile(spool, Ledger(redis_conn), redis_conn, submitted.append, skip={uids[0]})
    assert sorted(Spool.uid_of(path) for path in submitted) == sorted(uids[1:])
    assert counts["on_their_way"] == 1 and counts["resubmitted"] == 2


@pytest.fixture
def start(
    tmp_path: Path, redis_server: str, redis_conn: redis.Redis
) -> Iterator[Callable[..., Listener]]:
    yield from starting(partial(make_listener, tmp_path, redis_server))


def test_listener_processes_share_the_port_only_when_configured(
    start: Callable[..., Listener],
) -> None:
    """With ``processes`` > 1 the listeners bind one port together (SO_REUSEPORT); with 1, a
    second daemon on the same port fails to start instead of silently taking half the load."""
    first = start(processes=2)
    port = first.settings.listener.port
    start(processes=2, port=port)  # binds
    alone = start(port=free_port())
    with pytest.raises(OSError):
        start(port=alone.settings.listener.port)


@pytest.mark.e2e
def test_four_associations_over_two_listener_processes(tmp_path: Path) -> None:
    """`run` with ``listener.processes = 2``: two listen processes share the DICOM port, four
    associations at once are all acknowledged, and every instance is embedded once."""
    files = [
        factory.write(ds, tmp_path / f"{i:03d}.dcm")
        for i, ds in enumerate(factory.ct_series(40, rows=64, columns=64, identical=None))
    ]
    daemon = Daemon(tmp_path / "var", tmp_path / "daemon.log", LISTENER__PROCESSES="2")
    daemon.start()
    try:
        assert len(children(daemon, b"listen")) == 2
        with ThreadPoolExecutor(4) as pool:
            sent = list(
                pool.map(partial(storescu, daemon.dicom_port), [files[i::4] for i in range(4)])
            )
        assert [successes(result) for result in sent] == [10] * 4
        status = daemon.wait_embedded(40)
        assert status["counters"]["converted"] == 40
    finally:
        daemon.stop()


def test_processes_of_a_node_can_open_a_new_spool_at_once(tmp_path: Path) -> None:
    """`run` starts the dispatcher and the listeners together on a fresh state dir: each makes
    the spool's shard directories, and none may fail because another made one first."""
    with ThreadPoolExecutor(8) as pool:
        spools = list(
            pool.map(lambda _: Spool(tmp_path / "spool", tmp_path / "quarantine"), range(8))
        )
    assert len(spools) == 8
    assert sum(1 for p in (tmp_path / "spool").iterdir() if p.name != "tmp") == 256
