"""End to end: the full `pacs-embed run`, 2,000 CT instances over 10 studies, against the two
capacities it is made of, measured alone in the same run on the same daemon.

The endpoint is the local emulator (NOT MedImageInsight: a deterministic function of pixels)
with a fixed ``--capacity`` (requests in flight before 429) and ``--latency`` per answer; the
fleet-wide in-flight limit is set to the capacity, with the default ``workers.count``. Instances
are CT 512x512 int16 (tests/chaos.write_corpus), sent by DCMTK storescu, one association per
study, ``--associations`` studies at a time (default 1: one after the other), over loopback.
The SR/KOS go to a real Orthanc (the DICOM sink). Phases, one daemon:

A. ingest alone: the workers are SIGSTOPped, so nothing is embedded and nothing competes for
   the cores but the front half; set 1 is sent. Two figures: the C-STORE leg (first C-STORE to
   last answer) and **ingest capacity** = first C-STORE to every instance converted and queued.
   The reference is the latter: an instance can only be embedded once converted, so a C-STORE
   rate that conversion cannot keep up with would overstate what the front half feeds.
B. endpoint alone: the workers are resumed (SIGCONT) on the full queue; **endpoint capacity** =
   set 1's images / the time until all are embedded: the workers and the emulator, with no
   ingest competing. The ideal C x B / L (B = queue.batch_size) is printed beside it.
C. end to end: set 2 (new UIDs, same pixels' kind) with everything running; images/s from
   the first C-STORE to the last instance final (embedded, skipped or failed), as a fraction
   of the slower of A and B (goal >= 0.8), and of the ideal. RSS of the listener, of the
   dispatcher (and, summed, its conversion pool) and of each worker is sampled every 0.5 s:
   first/peak/last over C (goal: flat), with each one's cold figure from A's start.
D. latency: once set 2's SRs are in Orthanc, one fresh ``--slices`` study; its last C-STORE ->
   its SR in Orthanc (bench.push's machinery; goal <= study.stable_seconds + 5).

Each phase also prints the CPU seconds each role used and the host's busy share (from /proc),
to show where time goes and how much else ran on the machine: the figures shift with it.

    .venv/bin/python -m bench.e2e [--instances 2000] [--studies 10] [--latency 0.5]
        [--capacity 2] [--associations 1] [--slices 200] [--stable 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.push import LATENCY_SETTINGS, dicom_sink_env, sr_latency, study_files
from pipeline.ledger import Ledger
from pipeline.sections import QueueSettings
from tests.chaos import ChaosDaemon, role_of, write_corpus
from tests.daemon import argv, descendants, proc_stat, rss_kb, storescu, successes
from tests.orthanc import Orthanc

TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
#: Roles whose memory is sampled, each with its children (a conversion pool) summed apart.
SAMPLED = ("listen", "dispatch", "worker")


# -- the daemon's processes, from /proc ------------------------------------------------------


def roles(daemon: ChaosDaemon) -> dict[int, str]:
    """Every process below `run` by role; a child without a role of its own or with its
    parent's (the dispatcher's spawned conversion pool) is ``<parent's role> pool``."""
    assert daemon.proc is not None
    root = daemon.proc.pid
    own: dict[int, str | None] = {root: "run"}
    names = {root: "run"}
    for pid in descendants(root):  # a parent always comes before its children
        own[pid] = role_of([a.decode(errors="replace") for a in argv(pid) if a])
        fields = proc_stat(pid)
        parent = int(fields[1]) if fields is not None else root
        role = own[pid]
        if role is None or role == own.get(parent):
            role = names.get(parent, "other").removesuffix(" pool") + " pool"
        names[pid] = role
    return names


def cpu_ticks(pids: dict[int, str]) -> dict[int, int]:
    """utime + stime of each live pid, in clock ticks."""
    out = {}
    for pid in pids:
        fields = proc_stat(pid)
        if fields is not None:
            out[pid] = int(fields[11]) + int(fields[12])
    return out


class CpuMeter:
    """CPU seconds by role over a phase, from each ``sample`` (Watch takes one every 0.5 s; a
    process that exits is counted up to its last sample, one born meanwhile from zero), and
    the whole host's busy time: what the daemon did not use went to storescu, Orthanc, this
    script and whatever else runs on the machine, which shifts every figure."""

    def __init__(self, daemon: ChaosDaemon) -> None:
        self.daemon = daemon
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.host: list[int] = []

    def sample(self) -> None:
        names = roles(self.daemon)
        self.names.update(names)
        now = cpu_ticks(names)
        for pid, ticks in now.items():
            self.first.setdefault(pid, ticks if not self.last else 0)
        self.last.update(now)
        self.host[1:] = [host_busy_ticks()]
        if len(self.host) == 1:  # the first sample: the phase's start
            self.host.insert(0, self.host[0])

    def line(self, wall: float) -> str:
        used: dict[str, float] = defaultdict(float)
        for pid, ticks in self.last.items():
            used[self.names[pid]] += (ticks - self.first.get(pid, 0)) / TICKS
        total = sum(used.values())
        host = (self.host[-1] - self.host[0]) / TICKS
        parts = ", ".join(f"{r} {s:.1f}" for r, s in sorted(used.items(), key=lambda x: -x[1]))
        return (
            f"  CPU s by role: {parts}; daemon {total:.1f} = {total / (wall * CORES):.0%} of "
            f"{CORES} cores; host busy {host / (wall * CORES):.0%} (the rest: senders, Orthanc, "
            f"this script, other processes; load average {os.getloadavg()[0]:.1f})"
        )


def host_busy_ticks() -> int:
    """All cores' non-idle time from /proc/stat, in clock ticks."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]  # user..steal, less idle and iowait


@dataclass
class Watch:
    """While a phase runs: every ``every`` seconds, the RSS of each process in SAMPLED (and of
    each one's pool, summed), the CPU meter's samples and the ledger's embedded count."""

    daemon: ChaosDaemon
    every: float = 0.5
    rss: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    embedded: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, count)
    cpu: CpuMeter | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Watch:
        self.cpu = CpuMeter(self.daemon)
        self._ledger = Ledger(self.daemon.redis())
        self.cpu.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def _sample(self) -> None:
        assert self.cpu is not None
        self.cpu.sample()
        with contextlib.suppress(redis.RedisError):
            self.embedded.append((time.monotonic(), self._ledger.counts()["embedded"]))
        pools: dict[str, int] = defaultdict(int)
        for pid, name in roles(self.daemon).items():
            if name in SAMPLED:
                self.rss[f"{name} {pid}"].append(rss_kb(pid))
            elif name.removesuffix(" pool") in SAMPLED:
                pools[f"{name} (sum)"] += rss_kb(pid)
        for name, kb in pools.items():
            self.rss[name].append(kb)


# -- sending and waiting ---------------------------------------------------------------------


def send(port: int, studies: list[list[Path]], associations: int) -> float:
    """storescu, one association per study, ``associations`` at a time; the seconds from the
    first C-STORE to the last answer."""
    started = time.monotonic()
    with ThreadPoolExecutor(associations) as pool:
        results = list(pool.map(lambda files: storescu(port, files), studies))
    took = time.monotonic() - started
    for files, result in zip(studies, results, strict=True):
        if successes(result) != len(files):
            raise SystemExit(f"storescu failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return took


def wait(
    daemon: ChaosDaemon, done: Callable[[dict[str, int]], bool], what: str, stall: float = 60.0
) -> float:
    """Poll the ledger's counts (Redis, cheap) every 0.05 s until ``done(counts)``; monotonic
    time it was first seen true. Gives up when the counts have not moved for ``stall`` s."""
    ledger = Ledger(daemon.redis())
    counts, moved = ledger.counts(), time.monotonic()
    while not done(counts):
        if time.monotonic() - moved > stall:
            raise SystemExit(f"no progress for {stall:g} s waiting for {what}: {counts}")
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise SystemExit(f"daemon exited waiting for {what}\n{daemon.log_tail()}")
        time.sleep(0.05)
        now = ledger.counts()
        if now != counts:
            counts, moved = now, time.monotonic()
    return time.monotonic()


def final(counts: dict[str, int]) -> int:
    return counts["embedded"] + counts["skipped"] + counts["failed"]


def srs_in(pacs: Orthanc, daemon: ChaosDaemon, n: int, timeout: float = 300.0) -> None:
    """Until ``n`` SRs are in Orthanc: the studies completed and were pushed (so the next
    phase does not share the cores with their SR builds)."""
    query = {"Level": "Instance", "Query": {"Modality": "SR"}}
    daemon.wait_for(lambda: len(pacs.post("/tools/find", query)) >= n, timeout, f"{n} SRs")


def signal_workers(daemon: ChaosDaemon, sig: signal.Signals) -> list[int]:
    pids = [p for p, name in roles(daemon).items() if name.startswith("worker")]
    for pid in pids:
        os.kill(pid, sig)
    return pids


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    instances: int = 2000
    studies: int = 10
    latency: float = 0.5
    capacity: int = 2
    associations: int = 1
    slices: int = 200
    stable: float = 5.0


def run(opts: Options) -> None:
    batch = QueueSettings().batch_size
    ideal = opts.capacity * batch / opts.latency
    print(
        "pacs-embed end to end; the endpoint is the local emulator (NOT MedImageInsight), "
        f"capacity {opts.capacity} in flight, {opts.latency:g} s per answer, batch {batch}: "
        f"ideal {ideal:.1f} images/s"
    )
    print(
        f"{opts.instances} CT 512x512 int16 instances over {opts.studies} studies per set, "
        f"DCMTK storescu, one association per study, {opts.associations} at a time, loopback; "
        f"{CORES} cores; started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {_tree()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.monotonic()
        sets = [corpus(work / f"set{n}", opts, seed=n) for n in (1, 2)]
        latency_study = study_files(work / "latency", opts.slices)
        print(f"corpus written in {time.monotonic() - started:.0f} s", flush=True)
        daemon = ChaosDaemon(
            work / "var",
            work / "daemon.log",
            STUDY__STABLE_SECONDS=str(opts.stable),
            EMULATOR__CAPACITY=str(opts.capacity),
            EMULATOR__LATENCY_MS=str(opts.latency * 1000),
            ENDPOINT__MAX_IN_FLIGHT=str(opts.capacity),
            **LATENCY_SETTINGS,
        )
        with Orthanc(work / "orthanc", {"pe": ("PACS_EMBED", daemon.dicom_port)}) as pacs:
            daemon.env.update(dicom_sink_env(pacs))
            daemon.start()
            try:
                measure(daemon, pacs, sets, latency_study, opts, ideal)
            finally:
                with contextlib.suppress(OSError):  # a stopped worker would not stop
                    signal_workers(daemon, signal.SIGCONT)
                daemon.stop()


def _tree() -> str:
    """The code measured: the commit, and whether the working tree differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    changed = len(git("status", "--porcelain", "--untracked-files=no").splitlines())
    return f"commit {git('rev-parse', '--short', 'HEAD') or '?'}, {changed} files modified"


def corpus(directory: Path, opts: Options, seed: int) -> list[list[Path]]:
    """One set: ``opts.instances`` CT 512x512 files over ``opts.studies`` studies, per study."""
    studies = write_corpus(directory, opts.instances, opts.studies, size=512, seed=seed)
    return [[instance.path for instance in study] for study in studies]


def measure(
    daemon: ChaosDaemon,
    pacs: Orthanc,
    sets: list[list[list[Path]]],
    latency_study: tuple[str, list[Path]],
    opts: Options,
    ideal: float,
) -> None:
    n, port = opts.instances, daemon.dicom_port
    daemon.wait_for(lambda: len(daemon.status()["workers"]) >= 1, 60, "workers' reports")

    with Watch(daemon) as a:
        stopped = signal_workers(daemon, signal.SIGSTOP)
        t0 = time.monotonic()
        leg = send(port, sets[0], opts.associations)
        queued = wait(
            daemon,
            lambda c: c["received"] >= n and c["spooled"] + c["converting"] == 0,
            "set 1 converted and queued",
        )
    ingest = n / (queued - t0)
    print(f"A. ingest alone ({len(stopped)} workers SIGSTOPped), set 1:")
    print(f"  C-STORE leg, first C-STORE -> last answer: {n / leg:7.1f} images/s ({leg:.1f} s)")
    print(
        f"  ingest capacity, first C-STORE -> all converted and queued: {ingest:7.1f} images/s "
        f"({queued - t0:.1f} s)  <- reference"
    )
    print(_cpu(a, queued - t0), flush=True)

    with Watch(daemon) as b:
        t1 = time.monotonic()
        signal_workers(daemon, signal.SIGCONT)
        drained = wait(daemon, lambda c: final(c) >= n, "set 1 embedded")
    endpoint = n / (drained - t1)
    print("B. endpoint alone (workers resumed on set 1's full queue; no ingest meanwhile):")
    print(
        f"  endpoint capacity, resume -> all final: {endpoint:7.1f} images/s "
        f"({drained - t1:.1f} s; {endpoint / ideal:.2f} of the ideal {ideal:.1f})  <- reference"
    )
    print(_cpu(b, drained - t1), flush=True)
    srs_in(pacs, daemon, opts.studies)

    with Watch(daemon) as c:
        t2 = time.monotonic()
        leg2 = send(port, sets[1], opts.associations)
        at_last_store = Ledger(daemon.redis()).counts()["embedded"] - n
        done = wait(daemon, lambda c: final(c) >= 2 * n, "set 2 final")
    first = next((t for t, count in c.embedded if count > n), done) - t2
    e2e, slower = n / (done - t2), min(ingest, endpoint)
    which = "ingest" if ingest <= endpoint else "endpoint"
    counts = Ledger(daemon.redis()).counts()
    print("C. end to end, set 2 (everything running):")
    print(f"  C-STORE leg meanwhile: {n / leg2:7.1f} images/s ({leg2:.1f} s)")
    print(
        f"  first C-STORE -> last instance final: {e2e:7.1f} images/s ({done - t2:.1f} s) = "
        f"{e2e / slower:.2f} of the slower reference ({which}, {slower:.1f}; goal >= 0.8), "
        f"{e2e / ideal:.2f} of the endpoint's ideal"
    )
    print(
        f"  where it goes: first embedding seen at +{first:.1f} s (0.5 s samples); "
        f"{at_last_store} embedded when the last C-STORE was answered (+{leg2:.1f} s); "
        f"first embedding -> last final: {n / (done - t2 - first):.1f} images/s"
    )
    print(
        f"  ledger after both sets: embedded {counts['embedded']}, skipped {counts['skipped']}, "
        f"failed {counts['failed']}; emulator: {_emulator(daemon)}"
    )
    print(_cpu(c, done - t2), flush=True)
    print(_memory(a, c))

    srs_in(pacs, daemon, 2 * opts.studies)
    result = sr_latency(daemon, pacs, *latency_study, opts.stable)
    print("D. " + result.line())


def _cpu(watch: Watch, wall: float) -> str:
    assert watch.cpu is not None
    return watch.cpu.line(wall)


def _emulator(daemon: ChaosDaemon) -> str:
    stats = daemon.emulator_stats()
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(stats["statuses"].items()))
    return f"answers {{{statuses}}}, most in flight {stats['max_in_flight']}"


def _memory(cold: Watch, phase: Watch) -> str:
    """RSS in MB over phase C: first/peak/last; flat when last is within 20 % of first and
    peak within 20 % of last (the cold figure, at the start of A, is before any image)."""
    lines = [
        "  RSS over C, MB (cold at A's start) first/peak/last; flat = last-first and"
        " peak-last within 20 %:"
    ]
    for name, values in sorted(phase.rss.items()):
        if not values or not values[0]:
            continue
        first, peak, last = values[0] / 1024, max(values) / 1024, values[-1] / 1024
        before = cold.rss.get(name, [0])[0] / 1024
        flat = abs(last - first) <= 0.2 * first and peak - last <= 0.2 * last
        lines.append(
            f"    {name:<20} ({before:5.0f}) {first:6.0f} {peak:6.0f} {last:6.0f}  "
            f"last-first {last - first:+.0f} ({(last - first) / first:+.0%}), "
            f"peak-last {peak - last:.0f} ({(peak - last) / last:.0%}): "
            + ("flat" if flat else "NOT flat")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Options()
    parser.add_argument("--instances", type=int, default=defaults.instances)
    parser.add_argument("--studies", type=int, default=defaults.studies)
    parser.add_argument("--latency", type=float, default=defaults.latency, help="seconds")
    parser.add_argument("--capacity", type=int, default=defaults.capacity)
    parser.add_argument("--associations", type=int, default=defaults.associations)
    parser.add_argument("--slices", type=int, default=defaults.slices, help="latency study")
    parser.add_argument("--stable", type=float, default=defaults.stable, help="stable_seconds")
    args = parser.parse_args()
    # a plain `kill` still stops the daemon and Orthanc (the finally blocks run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    run(Options(**vars(args)))
    print(f"(took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
