"""Ingest benchmark: DCMTK storescu -> three receivers, on one association and on four, in one run.

Receivers, each measured in the same rounds (interleaved, median of ``--rounds``):

- DCMTK ``storescp`` (``--fork``), writing files: what a C receiver does on this disk;
- a bare pynetdicom SCP (:mod:`bench.bare_scp`) that only writes ``encoded_dataset()`` to a
  file — no fsync, no parsing: pynetdicom's own ceiling here;
- pacs-embed (`pacs-embed run`, fresh state dir per measurement) with one listener process and
  with ``--processes`` sharing the port: every instance fsynced into the spool before its
  0x0000, then handed on (the arrival log; the time until the ledger has every instance is
  printed too). The dispatcher converts and enqueues meanwhile, at its lower priority; the
  workers find no endpoint (a closed loopback port) and wait, so ingest is measured alone —
  ``bench.e2e`` measures everything together.

Rates are images/s of the C-STORE leg (first association request to the last response); ratios
compare pacs-embed with ``storescp`` and with the bare SCP measured in the same round. The fsync
share is pacs-embed's own ``spool_write_seconds`` (temp file, fsync, link, directory fsync) over
the one-association wall time.

    .venv/bin/python -m bench.ingest [--images 400] [--rounds 3] [--processes 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pipeline.ledger import Ledger
from tests import factory
from tests.conftest import free_port
from tests.daemon import Daemon, dcmtk_env, echo, storescu, successes

#: How long a reference receiver may take to start listening.
START_SECONDS = 20.0
#: How long the ledger may take to have every instance pacs-embed acknowledged.
RECORD_SECONDS = 60.0

Receiver = Callable[[Path], AbstractContextManager[tuple[int, Daemon | None]]]


def send(port: int, files: list[Path], associations: int) -> float:
    """Seconds for ``associations`` storescu processes at once to store ``files`` (split evenly)."""
    shares = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        results = list(pool.map(partial(storescu, port), shares))
    elapsed = time.perf_counter() - start
    for share, result in zip(shares, results, strict=True):
        if successes(result) != len(share):
            raise SystemExit(f"storescu failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return elapsed


def _listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_SECONDS
    while echo(port) != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the receiver on port {port} did not start")
        time.sleep(0.1)


@contextmanager
def _process(argv: list[str], port: int) -> Iterator[tuple[int, Daemon | None]]:
    proc = subprocess.Popen(
        argv, env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _listening(port, proc)
        yield port, None
    finally:
        proc.terminate()
        proc.wait(10)


def storescp(workdir: Path) -> AbstractContextManager[tuple[int, Daemon | None]]:
    port = free_port()
    workdir.mkdir(parents=True)
    argv = ["storescp", "-aet", "PACS_EMBED", "-od", str(workdir), "--fork", str(port)]
    return _process(argv, port)


def bare_scp(workdir: Path) -> AbstractContextManager[tuple[int, Daemon | None]]:
    port = free_port()
    return _process([sys.executable, "-m", "bench.bare_scp", str(port), str(workdir)], port)


def pacs_embed(processes: int) -> Receiver:
    @contextmanager
    def receiver(workdir: Path) -> Iterator[tuple[int, Daemon | None]]:
        workdir.mkdir(parents=True)
        daemon = Daemon(
            workdir / "var",
            workdir / "daemon.log",
            LOG__LEVEL="warning",
            LISTENER__PROCESSES=str(processes),
            ENDPOINT__URL=f"http://127.0.0.1:{free_port()}/score",  # nobody there
            ENDPOINT__AUTH="none",
        )
        try:
            daemon.start()
            settled = lambda: len(daemon.status()["workers"]) == 2  # noqa: E731 - all started
            daemon.wait_for(settled, 60, "the workers")
        except AssertionError as exc:
            daemon.stop()
            raise SystemExit(f"pacs-embed did not start: {exc}") from exc
        try:
            yield daemon.dicom_port, daemon
        finally:
            daemon.stop()

    return receiver


def spool_write_seconds(daemon: Daemon, n: int) -> float:
    """The sum of pacs-embed's durable-write histogram from its /metrics, once it counts all
    ``n`` writes (the listener flushes its counts every few seconds)."""
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.admin_port}/metrics")
    request.add_header("Authorization", f"Bearer {daemon.token()}")
    histogram: dict[str, float] = {}

    def complete() -> bool:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            for family in text_string_to_metric_families(response.read().decode()):
                if family.name == "pacs_embed_spool_write_seconds":
                    histogram.update({s.name: s.value for s in family.samples})
        return histogram.get("pacs_embed_spool_write_seconds_count", 0) >= n

    daemon.wait_for(complete, 30, f"{n} durable writes counted")
    return histogram["pacs_embed_spool_write_seconds_sum"]


def recorded_after(daemon: Daemon, n: int) -> float:
    """Seconds from now until the ledger has all ``n`` instances (the dispatcher took them
    from the arrival log), polled in its Redis every few milliseconds."""
    ledger = Ledger(daemon.redis())
    start = time.perf_counter()
    while ledger.counts()["received"] < n:
        if time.perf_counter() - start > RECORD_SECONDS:
            raise SystemExit(f"not all {n} instances reached the ledger in {RECORD_SECONDS} s")
        time.sleep(0.005)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="listener processes, 2nd row")
    args = parser.parse_args()
    n = args.images
    receivers: dict[str, Receiver] = {
        "DCMTK storescp": storescp,
        "bare pynetdicom SCP": bare_scp,
        "pacs-embed, 1 listener": pacs_embed(1),
        f"pacs-embed, {args.processes} listeners": pacs_embed(args.processes),
    }
    seconds: dict[tuple[str, int], list[float]] = defaultdict(list)
    fsync: list[float] = []
    handed_on: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        series = factory.ct_series(n, rows=args.size, columns=args.size, identical=None)
        files = [factory.write(ds, workdir / "in" / f"{i:05d}.dcm") for i, ds in enumerate(series)]
        runs = 0
        for round_ in range(args.rounds):
            for associations in (1, 4):
                for name, receiver in receivers.items():
                    runs += 1
                    os.sync()  # the previous receiver's unsynced files are not flushed meanwhile
                    with receiver(workdir / f"run{runs}") as (port, daemon):
                        elapsed = send(port, files, associations)
                        seconds[name, associations].append(elapsed)
                        if daemon is not None and associations == 1 and "1 listener" in name:
                            handed_on.append(recorded_after(daemon, n))
                            fsync.append(spool_write_seconds(daemon, n) / elapsed)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    def rate(name: str, associations: int) -> float:
        return n / statistics.median(seconds[name, associations])

    print(f"images: {n} CT {args.size}x{args.size} int16, storescu on loopback, ", end="")
    print(f"median of {args.rounds} rounds; images/s of the C-STORE leg")
    print(f"{'receiver':32} {'1 association':>28} {'4 associations':>28}")
    for name in receivers:
        cells = []
        for associations in (1, 4):
            r = rate(name, associations)
            cell = f"{r:8.1f}"
            if name.startswith("pacs-embed"):
                vs_dcmtk = r / rate("DCMTK storescp", associations)
                vs_bare = r / rate("bare pynetdicom SCP", associations)
                cell += f" ({vs_dcmtk:.2f}x scp, {vs_bare:.2f}x bare)"
            cells.append(f"{cell:>28}")
        print(f"{name:32} {cells[0]} {cells[1]}")
    print(
        f"fsync share, pacs-embed on one association: {statistics.median(fsync):.0%} of the wall "
        "time in the durable write (temp file, fsync, link, directory fsync)"
    )
    print(
        f"last 0x0000 -> every instance in the ledger: {statistics.median(handed_on):.2f} s "
        "(the arrival log, taken by the dispatcher)"
    )


if __name__ == "__main__":
    main()
