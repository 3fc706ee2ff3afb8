"""Idle and greedy connections, over real sockets: connections that never send an A-ASSOCIATE-RQ
hold no association slot and are closed after a short bound, slots are counted only for
requests the listener accepted, each peer address has a connection limit, and every refusal is
logged with its address and counts and shown in /status ``input``."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from dicom_listener.server import Listener
from pipeline.intake import IntakeLog
from pipeline.settings import Settings
from tests.conftest import free_port
from tests.daemon import echo

#: Loopback source addresses of the idle connections (Linux routes all of 127/8 to lo); the
#: real sender connects from 127.0.0.1.
IDLE_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


def make_listener(tmp_path: Path, url: str, **listener: object) -> Listener:
    """A listener (not started) on a free loopback port, with these [listener] settings.
    Shared by the listener's test modules."""
    settings = Settings.load(
        state_dir=tmp_path,
        redis={"url": url},
        listener={"host": "127.0.0.1", "port": free_port(), "min_free_disk_mb": 1, **listener},
        log={"level": "warning"},
    )
    return Listener(settings, redis.Redis.from_url(url))


def starting(make: Callable[..., Listener]) -> Iterator[Callable[..., Listener]]:
    """For a fixture to yield from: starts a listener made by ``make`` with these [listener]
    settings; every one started is stopped at the end."""
    started: list[Listener] = []

    def _start(**listener: object) -> Listener:
        scp = make(**listener)
        scp.start()
        started.append(scp)
        return scp

    yield _start
    for scp in started:
        scp.stop()


@pytest.fixture
def start(
    tmp_path: Path, redis_server: str, redis_conn: redis.Redis
) -> Iterator[Callable[..., Listener]]:
    """Starts a listener with these [listener] settings; stopped at the end."""
    yield from starting(partial(make_listener, tmp_path, redis_server))


def _connect(port: int, source: str, stack: ExitStack) -> socket.socket:
    """A TCP connection to the listener from ``source`` that sends nothing."""
    sock = stack.enter_context(socket.socket())
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the listener closed ``sock`` (read EOF or reset), None if still open."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        data = sock.recv(64)
    except TimeoutError:
        return None
    except ConnectionResetError:
        data = b""
    assert data == b"", data  # nothing sent to a connection that never asked
    return time.monotonic() - started


def _rejected(connection: redis.Redis, events: int) -> dict[str, int]:
    """/status input's rejected associations once they count ``events`` (at most 5 s): a
    refusal is recorded in the listener's thread, after the peer saw its connection close."""
    deadline = time.monotonic() + 5.0
    while True:
        rejected: dict[str, int] = IntakeLog(connection).summary()["associations_rejected"]
        if sum(rejected.values()) >= events or time.monotonic() > deadline:
            return rejected
        time.sleep(0.05)


def _associate(port: int, calling: str = "SENDER") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="PACS_EMBED")


def test_idle_connections_do_not_shut_out_a_sender(start: Callable[..., Listener]) -> None:
    """Twenty connections that never send an A-ASSOCIATE-RQ (more than max_associations = 16),
    then DCMTK echoscu: it is accepted at once, because idle connections hold no slot."""
    scp = start()
    port = scp.settings.listener.port
    assert scp.settings.listener.max_associations == 16
    with ExitStack() as stack:
        for n in range(20):
            _connect(port, IDLE_SOURCES[n % len(IDLE_SOURCES)], stack)
        time.sleep(0.3)  # every idle connection accepted and waiting
        began = time.monotonic()
        assert echo(port) == 0
        assert time.monotonic() - began < 3.0


def test_idle_connections_are_closed_after_the_bound_and_counted(
    start: Callable[..., Listener], redis_conn: redis.Redis
) -> None:
    """Connections silent for association_request_timeout_seconds are closed (not after
    pynetdicom's 30 s), one dripping a PDU header too; each is logged and shown in /status."""
    scp = start(association_request_timeout_seconds=1.0)
    port = scp.settings.listener.port
    with ExitStack() as stack, capture_logs() as logs:
        idle = [_connect(port, IDLE_SOURCES[n % 4], stack) for n in range(8)]
        dripping = _connect(port, "127.0.0.6", stack)
        dripping.sendall(b"\x01\x00")  # the start of an A-ASSOCIATE-RQ header, then nothing
        times = [_closed_within(sock, 4.0) for sock in [*idle, dripping]]
        assert None not in times, times
        assert max(t for t in times if t is not None) < 3.0, times  # 1 s, 2 s cut-off, slack
        rejected = _rejected(redis_conn, 9)  # each logged, then recorded
    assert rejected == {"no association request within 1 s": 9}, rejected
    refused = [entry for entry in logs if entry["event"] == "connection.refused"]
    assert len(refused) == 9, refused
    assert {entry["address"] for entry in refused} == {*IDLE_SOURCES, "127.0.0.6"}
    assert all(entry["connections"] >= 1 for entry in refused)


def test_a_hang_up_or_garbage_is_counted_at_once(
    start: Callable[..., Listener], redis_conn: redis.Redis
) -> None:
    """A connection closed without a request, and one sending what is not an A-ASSOCIATE-RQ
    (answered A-ABORT), are counted when they end, not after the timeout."""
    scp = start(association_request_timeout_seconds=30.0)
    port = scp.settings.listener.port
    with ExitStack() as stack:
        _connect(port, "127.0.0.2", stack).close()
        garbage = _connect(port, "127.0.0.3", stack)
        garbage.sendall(b"\x09\x00\x00\x00\x00\x00")  # PDU type 9 does not exist
        garbage.settimeout(5.0)
        assert garbage.recv(6)[:1] == b"\x07"  # A-ABORT
        rejected = _rejected(redis_conn, 2)
    assert rejected == {"no decodable association request": 2}, rejected


def test_a_peer_over_its_connection_limit_is_refused_and_shown(
    start: Callable[..., Listener], redis_conn: redis.Redis
) -> None:
    """A fourth connection from an address already holding max_connections_per_peer = 3 is
    closed at once, logged with the address and counts, and listed in /status input; another
    address is not affected."""
    scp = start(max_connections_per_peer=3, association_request_timeout_seconds=10.0)
    port = scp.settings.listener.port
    with ExitStack() as stack, capture_logs() as logs:
        held = [_connect(port, "127.0.0.7", stack) for _ in range(3)]
        time.sleep(0.2)
        over = _connect(port, "127.0.0.7", stack)
        assert (_closed_within(over, 2.0) or 99) < 2.0  # refused, not left to the 10 s bound
        for sock in held:
            assert _closed_within(sock, 0.1) is None  # the three it holds stay open
        assoc = _associate(port)  # from 127.0.0.1: its own limit
        assert assoc.is_established
        assoc.release()
    [entry] = [entry for entry in logs if entry["event"] == "connection.refused"]
    assert entry["address"] == "127.0.0.7"
    assert (entry["connections"], entry["limit"]) == (4, 3)
    assert entry["reason"] == "too many connections from this address"
    summary = IntakeLog(redis_conn).summary()
    assert summary["associations_rejected"] == {"too many connections from this address": 1}
    [event] = [e for e in summary["recent"] if e["kind"] == "association_rejected"]
    assert (event["address"], event["reason"]) == (
        "127.0.0.7",
        "too many connections from this address",
    )


def test_slots_are_for_associations_and_over_them_is_local_limit_exceeded(
    start: Callable[..., Listener], redis_conn: redis.Redis
) -> None:
    """With max_associations = 2: two associations run, a third is rejected the PS3.8 way
    (A-ASSOCIATE-RJ rejected-transient, service-provider presentation, local-limit-exceeded),
    and a slot given back is usable again."""
    scp = start(max_associations=2)
    port = scp.settings.listener.port
    first, second = _associate(port), _associate(port)
    assert first.is_established and second.is_established
    with capture_logs() as logs:
        third = _associate(port)
        assert _rejected(redis_conn, 1) == {"local limit exceeded": 1}  # logged, then recorded
    assert third.is_rejected
    answer = third.acceptor.primitive
    assert (answer.result, answer.result_source, answer.diagnostic) == (0x02, 0x03, 0x02)
    [entry] = [entry for entry in logs if entry["event"] == "association.rejected"]
    assert (entry["associations"], entry["limit"], entry["calling_ae"]) == (2, 2, "SENDER")
    assert entry["address"] == "127.0.0.1"
    first.release()
    deadline = time.monotonic() + 5
    while True:  # the slot is given back when the association's thread has ended
        fourth = _associate(port)
        if fourth.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert fourth.is_established
    assert fourth.send_c_echo().Status == 0x0000
    fourth.release()
    second.release()


def test_a_disallowed_calling_ae_holds_no_slot(start: Callable[..., Listener]) -> None:
    """A request the allow-list rejects never takes a slot: with one slot, held, an unknown
    calling AE is told "calling AE title not recognised", not "local limit exceeded"."""
    scp = start(max_associations=1, allowed_calling_aets=["SENDER"])
    port = scp.settings.listener.port
    holder = _associate(port)
    assert holder.is_established
    stranger = _associate(port, calling="STRANGER")
    answer = stranger.acceptor.primitive
    assert stranger.is_rejected and (answer.result_source, answer.diagnostic) == (0x01, 0x03)
    holder.release()
