"""Chaos harness: the real `pacs-embed run` under kill -9, endpoint faults and overload, judged
at the end by an oracle that reads what the daemon kept.

The pieces, each usable on its own (tests/test_chaos.py runs them CI-sized, bench/chaos.py full):

    ChaosDaemon   tests.daemon.Daemon, plus its processes by role (found in /proc below `run`),
                  its private Redis and its emulator (outage switch, stats)
    write_corpus  CT instances over studies, as Part 10 files, one list per study
    PacsSender    a PACS's forward jobs: one association per study (pynetdicom, or DCMTK storescu
                  with TCP_NODELAY=1), every answer of every instance recorded; what was not
                  acknowledged (no answer, 0xA7xx) is sent again after a growing pause
    Killer        kill -9 of roles at seeded random moments, each kill only once its role runs
    RssSampler    the peak resident memory of the listener (its own, and with its pool)
    FinalWatch    samples the final states while a scenario runs: a final state must not regress
    judge         the oracle (Verdict): lost, duplicated, partial and orphan files
    crash, faults, overload   the three scenarios, sized by the caller; each returns a Result
                  whose line() is the one line a scenario prints

The oracle's definitions (Verdict): *acknowledged* is an instance that got 0x0000 (or a warning)
at least once; *lost* is acknowledged and not in a final ledger state (embedded, skipped, failed)
when the wait ends; *duplicated* counts embeddings committed more than once: the ledger's
cumulative ``embedded`` counter, which only the store's transaction that marks an instance
embedded increments, minus the distinct embedded instances, plus every image a series' running
sum counted more than once (``count`` over its distinct ``i:<image>`` fields, and the stored sum
checked against the sum of the stored vectors). The endpoint's own count of images it answered is
*not* the measure: a worker killed after the answer and before its commit makes the batch run
again by design (at-least-once delivery to an HTTP endpoint), with one stored result; that
number is reported apart, as ``rework``. A *partial* file is anything in the spool's ``tmp/`` or
not named ``<uid>.dcm`` in a shard; an *orphan* is a spool file whose instance is in no ledger
state. Only spool retention may delete a spool file, after delivery: final instances without
their file beyond the count retention logged as deleted are reported, and so is any unfinished
instance without a file (nor a quarantined copy), which can never finish.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, cast

import numpy as np
import redis
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_listener.spool import SUFFIX, Spool
from pipeline import keys
from pipeline.ledger import Ledger
from tests import factory
from tests.daemon import AE_TITLE, Daemon, argv, dcmtk_env, descendants, proc_stat, rss_kb

HOST = "127.0.0.1"

#: Distinct pixel arrays a corpus cycles through (generating a phantom per instance is slow).
PIXEL_POOL = 32


# -- the daemon's processes --------------------------------------------------------------------


def _argv(pid: int) -> list[str]:
    return [part.decode(errors="replace") for part in argv(pid) if part]


def _parent(pid: int) -> int | None:
    fields = proc_stat(pid)
    return int(fields[1]) if fields is not None else None


def role_of(args: Sequence[str]) -> str | None:
    """``redis``, or the `pacs-embed` subcommand a process runs (``run``, ``listen``, ...)."""
    if not args:
        return None
    if "redis-server" in Path(args[0].split(" ", 1)[0]).name:
        return "redis"  # redis rewrites its title: "redis-server unixsocket:..."
    for i, part in enumerate(args):
        if part == "pacs_embed" or part.endswith("/pacs-embed"):
            rest = list(args[i + 1 :])
            while rest and rest[0].startswith("-"):  # --config FILE
                rest = rest[2:] if rest[0] == "--config" else rest[1:]
            return rest[0] if rest else None
    return None


class ChaosDaemon(Daemon):
    """`pacs-embed run`, seen as its process tree, its Redis and its emulator."""

    def processes(self) -> dict[str, list[int]]:
        """Live pids by role, below `run`. A process whose parent has its role is not counted
        (rq forks a scheduler below a worker, with the worker's command line)."""
        assert self.proc is not None
        tree = descendants(self.proc.pid)
        roles = {pid: role_of(_argv(pid)) for pid in tree}
        found: dict[str, list[int]] = defaultdict(list)
        for pid, role in roles.items():
            if role is not None and roles.get(_parent(pid) or 0) != role:
                found[role].append(pid)
        return {role: sorted(pids) for role, pids in found.items()}

    def pids(self, role: str) -> list[int]:
        return self.processes().get(role, [])

    def listener_in_run(self) -> bool:
        """The listener runs inside `run` (no `listen` child): killing it kills the daemon."""
        return not self.pids("listen")

    @property
    def emulator_url(self) -> str:
        return f"http://{HOST}:{self.env['PACS_EMBED_EMULATOR__PORT']}"

    def emulator_stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.emulator_url}/stats", timeout=5) as response:  # noqa: S310
            return dict(json.load(response))

    def outage(self, seconds: float) -> None:
        """Every /score of the emulator answers 503 for ``seconds`` (``POST /outage``)."""
        key = (self.state_dir / "secrets" / "endpoint.key").read_text().strip()
        request = urllib.request.Request(  # noqa: S310 - loopback
            f"{self.emulator_url}/outage",
            data=json.dumps({"seconds": seconds}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5):  # noqa: S310 - loopback
            pass

    def strays(self) -> list[int]:
        """Processes started for this state dir (its env names it) that are not below `run`:
        children a kill left behind (a conversion pool process whose listener died, say)."""
        assert self.proc is not None
        ours = {self.proc.pid, *descendants(self.proc.pid)}
        marker = f"PACS_EMBED_STATE_DIR={self.state_dir}".encode()
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            pid = int(environ.parent.name)
            try:
                if pid not in ours and marker in environ.read_bytes().split(b"\0"):
                    found.append(pid)
            except OSError:
                continue
        return [pid for pid in found if _parent(pid) is not None]


@contextlib.contextmanager
def running(daemon: ChaosDaemon, timeout: float = 90.0) -> Iterator[ChaosDaemon]:
    """Started, then stopped with Ctrl-C whatever happens; a failed start shows its log."""
    try:
        daemon.start(timeout)
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(60)


# -- what is sent ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    path: Path
    sop_uid: str
    study_uid: str
    series_uid: str


def write_corpus(
    directory: Path, instances: int, studies: int, size: int = 128, seed: int = 0
) -> list[list[Instance]]:
    """``instances`` CT slices of ``size`` x ``size`` over ``studies`` studies (a series each),
    as Part 10 files; returned per study, as a PACS forwards them."""
    pool = [
        np.clip(np.rint(factory.phantom(size, size, seed=seed * 1000 + i)) + 1024, 0, 32767).astype(
            np.int16
        )
        for i in range(PIXEL_POOL)
    ]
    out: list[list[Instance]] = []
    for s in range(studies):
        study_uid, series_uid = factory.new_uid(), factory.new_uid()
        count = instances // studies + (1 if s < instances % studies else 0)
        job = []
        for i in range(count):
            ds = factory.ct_slice(
                study_uid=study_uid,
                series_uid=series_uid,
                instance_number=i + 1,
                pixels=pool[(s * 7 + i) % PIXEL_POOL],
            )
            path = factory.write(ds, directory / f"study{s:02d}" / f"{i:04d}.dcm")
            job.append(Instance(path, str(ds.SOPInstanceUID), study_uid, series_uid))
        out.append(job)
    return out


def acknowledged(status: int | None) -> bool:
    """0x0000, or a warning (0xBxxx): the SCP took responsibility for the instance."""
    return status is not None and (status == 0 or status & 0xF000 == 0xB000)


def out_of_resources(status: int | None) -> bool:
    return status is not None and status & 0xFF00 == 0xA700


class SendLog:
    """Every answer each instance got, in order: a DIMSE status, or None (no answer: the
    association was aborted or the connection lost before it came)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.answers: dict[str, list[tuple[float, int | None]]] = defaultdict(list)
        self.associations_failed = 0

    def record(self, sop_uid: str, status: int | None) -> None:
        with self._lock:
            self.answers[sop_uid].append((time.monotonic(), status))

    def statuses(self) -> dict[str, list[int | None]]:
        with self._lock:
            return {uid: [s for _, s in answers] for uid, answers in self.answers.items()}

    def acked(self) -> set[str]:
        return {uid for uid, seen in self.statuses().items() if any(map(acknowledged, seen))}

    def count(self, predicate: Callable[[int | None], bool], since: float = 0.0) -> int:
        """Answers matching ``predicate`` (those after monotonic time ``since``)."""
        with self._lock:
            answers = [a for answers in self.answers.values() for a in answers]
        return sum(1 for t, s in answers if t > since and predicate(s))

    def first(self, predicate: Callable[[int | None], bool]) -> float | None:
        with self._lock:
            times = [t for answers in self.answers.values() for t, s in answers if predicate(s)]
        return min(times) if times else None

    def summary(self) -> dict[str, int]:
        every = self.statuses()
        return {
            "acked": sum(1 for statuses in every.values() if any(map(acknowledged, statuses))),
            "answers": sum(len(statuses) for statuses in every.values()),
            "a7xx": self.count(out_of_resources),
            "no_answer": self.count(lambda s: s is None),
            "refused": self.count(lambda s: s is not None and not acknowledged(s)),
            "resent": sum(1 for statuses in every.values() if len(statuses) > 1),
            "assoc_failed": self.associations_failed,
        }


#: storescu's words for a C-STORE response status (-v prints the words, not the code).
_DCMTK_STATUS = {"Success": 0x0000, "Refused: OutOfResources": 0xA700}


class PacsSender:
    """What a PACS does with a forward job: send the study on one association and, while some
    instances were not acknowledged (no answer, 0xA7xx, the association aborted), send those
    again after a pause that grows. A permanent refusal (0xA9xx, 0xCxxx) is not retried.

    The first ``dcmtk_jobs`` studies go through DCMTK ``storescu`` (``TCP_NODELAY=1``; its
    default "halt on an unsuccessful store" is that same behaviour), the others through
    pynetdicom. ``pace`` seconds separate two instances of a job, so that sending spans a
    chosen time (a PACS forwards as the modality produces).
    """

    def __init__(
        self,
        port: int,
        jobs: Sequence[Sequence[Instance]],
        *,
        dcmtk_jobs: int = 0,
        pace: float = 0.0,
        pause: float = 1.0,
        max_pause: float = 5.0,
        deadline: float = 600.0,
        dcmtk_chunk: int = 25,
    ) -> None:
        self.port = port
        self.jobs = [list(job) for job in jobs]
        self.dcmtk_jobs = dcmtk_jobs
        self.pace = pace
        self.pause = pause
        self.max_pause = max_pause
        self.deadline = deadline
        self.dcmtk_chunk = dcmtk_chunk
        self.log = SendLog()
        self.errors: list[str] = []
        self.notes: list[str] = []  # why an instance got no answer (the first few)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._forward, args=(i,), name=f"pacs-{i}", daemon=True)
            for i in range(len(self.jobs))
        ]
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # aborts are the point here

    @property
    def instances(self) -> list[Instance]:
        return [instance for job in self.jobs for instance in job]

    def start(self) -> PacsSender:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def wait(self, timeout: float) -> bool:
        """True once every job ended (all acknowledged, refused, or the deadline passed)."""
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        self._stop.set()
        self.wait(60)

    def _forward(self, index: int) -> None:
        pending = self.jobs[index]
        pause = self.pause
        send = self._dcmtk if index < self.dcmtk_jobs else self._pynetdicom
        try:
            while pending and not self._stop.is_set():
                if time.monotonic() - self.started > self.deadline:
                    self.errors.append(f"job {index}: {len(pending)} unacknowledged at deadline")
                    return
                send(pending)
                answers = self.log.statuses()
                pending = [i for i in pending if _retry(answers.get(i.sop_uid, []))]
                if pending:
                    self._stop.wait(pause)
                    pause = min(self.max_pause, pause * 1.5)
        except Exception as exc:  # a thread must not die silently: the oracle reports it
            self.errors.append(f"job {index}: {type(exc).__name__}: {exc}")

    def _pynetdicom(self, pending: list[Instance]) -> None:
        ae = AE(ae_title="CHAOS_PACS")
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 10, 30, 30
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate(HOST, self.port, ae_title=AE_TITLE)
        if not assoc.is_established:
            self.log.associations_failed += 1
            return
        try:
            for n, instance in enumerate(pending, start=1):
                if self._stop.is_set():
                    break
                try:
                    response = assoc.send_c_store(instance.path, msg_id=n % 65536)
                    status = int(response.Status) if "Status" in response else None
                    why = f"no response, aborted={assoc.is_aborted}"
                except (RuntimeError, OSError, ValueError, AttributeError) as exc:
                    status, why = None, f"{type(exc).__name__}: {exc}"
                if status is None:
                    self._note(f"pynetdicom {instance.path.name}: {why}")
                self.log.record(instance.sop_uid, status)
                if not acknowledged(status) or not assoc.is_established:
                    break  # halt the job; what is left is sent again after the pause
                if self.pace:
                    self._stop.wait(self.pace)
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()

    def _dcmtk(self, pending: list[Instance]) -> None:
        for start in range(0, len(pending), self.dcmtk_chunk):
            chunk = pending[start : start + self.dcmtk_chunk]
            if self._stop.is_set() or not self._storescu(chunk):
                return
            if self.pace:
                self._stop.wait(self.pace * len(chunk))

    def _storescu(self, chunk: list[Instance]) -> bool:
        """One association; True when every instance of ``chunk`` was acknowledged."""
        by_path = {str(i.path): i for i in chunk}
        result = subprocess.run(
            [
                *("storescu", "-v", "-aec", AE_TITLE, "-aet", "CHAOS_DCMTK"),
                *("-to", "10", "-ta", "10", "-td", "30", HOST, str(self.port)),
                *by_path,
            ],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
            check=False,
        )
        current: Instance | None = None
        answered = True
        all_acked = True
        for line in result.stdout.splitlines():
            if "Sending file: " in line:
                if current is not None and not answered:
                    self.log.record(current.sop_uid, None)
                current, answered = by_path.get(line.split("Sending file: ", 1)[1].strip()), False
            elif "Received Store Response (" in line and current is not None:
                words = line.split("Received Store Response (", 1)[1].rsplit(")", 1)[0]
                status = _DCMTK_STATUS.get(words, 0xB000 if words.startswith("Warning") else 0xC000)
                self.log.record(current.sop_uid, status)
                answered = True
                all_acked = all_acked and acknowledged(status)
        if current is not None and not answered:
            self.log.record(current.sop_uid, None)
            self._note(
                f"storescu {current.path.name}: " + " | ".join(result.stdout.splitlines()[-3:])
            )
        if current is None:
            self.log.associations_failed += 1
        return all_acked and answered and result.returncode == 0

    def _note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(f"+{time.monotonic() - self.started:.1f} s {text}")


def _retry(statuses: list[int | None]) -> bool:
    """Send this instance again: never acknowledged, and not refused for good."""
    if any(map(acknowledged, statuses)):
        return False
    return not statuses or statuses[-1] is None or out_of_resources(statuses[-1])


# -- chaos ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    at: float  # time.monotonic()
    role: str
    pid: int


class Killer:
    """kill -9, one role after the other as ``plan`` says: once the role runs (its supervisor
    restarted it), a seeded random gap later, one of its processes. A role that does not come
    back within ``restart_timeout`` is an error, and its kill is skipped."""

    def __init__(
        self,
        daemon: ChaosDaemon,
        plan: Sequence[str],
        *,
        gaps: tuple[float, float],
        seed: int,
        restart_timeout: float = 90.0,
    ) -> None:
        self.daemon = daemon
        self.plan = list(plan)
        self.gaps = gaps
        self.rng = random.Random(seed)
        self.restart_timeout = restart_timeout
        self.kills: list[Kill] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="killer", daemon=True)

    @staticmethod
    def plan_for(roles: Sequence[str], kills: int, seed: int) -> list[str]:
        """``kills`` roles, each of ``roles`` as often as the others (±1), in seeded order."""
        plan = [roles[i % len(roles)] for i in range(kills)]
        random.Random(seed).shuffle(plan)
        return plan

    def start(self) -> Killer:
        self._thread.start()
        return self

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    @property
    def last(self) -> float | None:
        return self.kills[-1].at if self.kills else None

    def _run(self) -> None:
        try:
            for role in self.plan:
                pid = None
                while pid is None and self._running(role):
                    if self._stop.wait(self.rng.uniform(*self.gaps)):
                        return
                    pids = self.daemon.pids(role)  # it may have died alone meanwhile
                    pid = self.rng.choice(pids) if pids else None
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    self.kills.append(Kill(time.monotonic(), role, pid))
        except Exception as exc:
            self.errors.append(f"killer: {type(exc).__name__}: {exc}")

    def _running(self, role: str) -> bool:
        """Wait until ``role`` runs (its supervisor restarted it); False if it does not come
        back within ``restart_timeout``, or `run` itself is gone."""
        deadline = time.monotonic() + self.restart_timeout
        while not self._stop.is_set():
            proc = self.daemon.proc
            if proc is None or proc.poll() is not None:
                self.errors.append(f"`run` itself is gone (exit {proc and proc.returncode})")
                self._stop.set()
                return False
            if self.daemon.pids(role):
                return True
            if time.monotonic() > deadline:
                self.errors.append(f"no {role} process {self.restart_timeout:.0f} s on")
                return False
            time.sleep(0.1)
        return False


class _Sampling:
    """A daemon thread running ``_run`` for the length of a ``with`` block (``_run`` returns
    once ``_stop`` is set)."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        raise NotImplementedError


class RssSampler(_Sampling):
    """Peak resident memory of the listener process alone and with its children (the
    conversion pool), sampled every ``every`` seconds, across restarts."""

    def __init__(self, daemon: ChaosDaemon, role: str = "listen", every: float = 0.1) -> None:
        self.daemon = daemon
        self.role = role
        self.every = every
        self.peak_kb = 0
        self.peak_tree_kb = 0
        super().__init__("rss")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):  # a process that just died: next sample
                for pid in self.daemon.pids(self.role):
                    own = rss_kb(pid)
                    tree = own + sum(rss_kb(child) for child in descendants(pid))
                    self.peak_kb = max(self.peak_kb, own)
                    self.peak_tree_kb = max(self.peak_tree_kb, tree)


class FinalWatch(_Sampling):
    """Samples the final states every ``every`` seconds and records each instance that leaves
    them: a final state should never regress. Each regression says whether Redis restarted
    since the previous sample (its append-only file, fsynced every second, loses up to a second
    of writes) and where the instance is now."""

    def __init__(self, daemon: ChaosDaemon, every: float = 0.25) -> None:
        self.daemon = daemon
        self.every = every
        self.regressions: list[tuple[float, str, str]] = []  # (monotonic time, uid, why)
        super().__init__("final-watch")

    def _run(self) -> None:
        connection = self.daemon.redis()
        before: set[str] = set()
        redis_before = self.daemon.pids("redis")
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):  # Redis away: compare with the next sample
                now = _final_members(connection)
                redis_now = self.daemon.pids("redis")
                for uid in sorted(before - now):
                    where = _where(connection, uid)
                    why = "redis restarted" if redis_now != redis_before else "moved back"
                    self.regressions.append((time.monotonic(), uid, f"{why}, now {where}"))
                before, redis_before = now, redis_now


def _final_members(connection: redis.Redis) -> set[str]:
    with connection.pipeline(transaction=False) as pipe:
        pipe.smembers(keys.EMBEDDED)
        pipe.hkeys(keys.FAILED)
        pipe.hkeys(keys.SKIPPED)
        embedded, failed, skipped = pipe.execute()
    return {keys.text(u) for u in (*embedded, *failed, *skipped)}


def _where(connection: redis.Redis, uid: str) -> list[str]:
    """The ledger states holding ``uid`` (one, normally)."""
    sets = {
        "spooled": keys.SPOOLED,
        "converting": keys.CONVERTING,
        "queued": keys.QUEUED,
        "embedded": keys.EMBEDDED,
    }
    found = [name for name, key in sets.items() if connection.sismember(key, uid)]
    found += [
        name
        for name, key in (("failed", keys.FAILED), ("skipped", keys.SKIPPED))
        if connection.hexists(key, uid)
    ]
    return found


# -- the oracle --------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What the daemon kept, against what the sender was told (definitions: module docstring)."""

    sent: int
    acked: int
    embedded: int
    lost: list[str]  # acknowledged, not in a final state
    not_embedded: dict[str, str]  # final, but skipped or failed: uid -> state and reason
    double_commits: int  # ledger: `embedded` events beyond the distinct embedded instances
    double_counted: int  # images counted more than once in their series' sum
    sum_mismatch: list[str]  # series whose stored sum is not the sum of its stored vectors
    partials: list[str]  # files in the spool's tmp dir, or not named <uid>.dcm in a shard
    orphans: list[str]  # spool files whose instance is in no ledger state
    unsent_in_ledger: list[str]  # ledger instances this run never sent
    missing_spool: list[str]  # acknowledged, not final, no spool or quarantine file
    spool_deleted: list[str]  # final, file gone (only spool retention may delete it)
    retention_deleted: int  # files spool retention says it deleted (its log)
    received_short: int  # in a ledger state but not in pe:received (its "ever received" set)
    reconverted: int  # conversions beyond one per converted instance (redone work, not an error)
    quarantined: int
    stored_images: int
    rework: int | None  # images the endpoint answered beyond the images stored (not an error)
    strays: list[int] = field(default_factory=list)

    @property
    def duplicated(self) -> int:
        return self.double_commits + self.double_counted

    def problems(self) -> list[str]:
        """Every broken promise, one line each; empty when the run kept them all."""
        checks = {
            "lost": self.lost,
            "not embedded": self.not_embedded,
            "sum mismatch": self.sum_mismatch,
            "partial files": self.partials,
            "orphan spool files": self.orphans,
            "ledger instances never sent": self.unsent_in_ledger,
            "unfinished without spool file": self.missing_spool,
            "stray processes": self.strays,
        }
        found = [f"{name}: {len(v)} {sorted(map(str, v))[:5]}" for name, v in checks.items() if v]
        if self.duplicated:
            found.append(
                f"duplicated: {self.double_commits} double commits, "
                f"{self.double_counted} double-counted images"
            )
        if len(self.spool_deleted) > self.retention_deleted:
            found.append(
                f"spool files of {len(self.spool_deleted)} final instances gone, but retention "
                f"deleted {self.retention_deleted}: {self.spool_deleted[:3]}"
            )
        if self.acked != self.sent:
            found.append(f"acknowledged {self.acked} of {self.sent} sent")
        return found


def final(connection: redis.Redis, uids: list[str]) -> list[bool]:
    out: list[bool] = []
    ledger = Ledger(connection)
    for start in range(0, len(uids), 1000):
        out.extend(ledger.final(uids[start : start + 1000]))
    return out


def wait_final(
    daemon: ChaosDaemon, uids: Callable[[], list[str]], timeout: float, every: float = 0.25
) -> float | None:
    """The moment every instance of ``uids()`` (asked again each time) was seen final, or None
    after ``timeout``; Redis being away (killed, restarting) is waited out."""
    connection = daemon.redis()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            wanted = uids()
            if wanted and all(final(connection, wanted)):
                return time.monotonic()
        time.sleep(every)
    return None


def wait_settled(daemon: ChaosDaemon, timeout: float = 30.0) -> bool:
    """Nothing on the queue or running, and every dispatcher idle: no late state change."""
    connection = daemon.redis()
    deadline = time.monotonic() + timeout
    queue_key = f"{keys.RQ_PREFIX}:queue:embed"
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, KeyError, AssertionError):
            busy = connection.llen(queue_key) + connection.zcard("rq:wip:embed")
            busy += connection.zcard("rq:scheduled:embed")
            counts = Ledger(connection).counts()
            moving = counts["spooled"] + counts["converting"] + counts["queued"]
            reports = daemon.status()["dispatchers"].values()
            if not busy and not moving and all(r["backlog"] == 0 for r in reports):
                return True
        time.sleep(0.5)
    return False


def judge(daemon: ChaosDaemon, sender: PacsSender) -> Verdict:
    """Read the final state and hold it against what the sender was told. (``rework`` assumes
    the emulator ran throughout: its counts start again with it.)"""
    connection = daemon.redis()
    sent = {i.sop_uid: i for i in sender.instances}
    acked = sender.log.acked()
    embedded = {keys.text(u) for u in connection.smembers(keys.EMBEDDED)}
    failed = {keys.text(k): keys.text(v) for k, v in connection.hgetall(keys.FAILED).items()}
    skipped = {keys.text(k): keys.text(v) for k, v in connection.hgetall(keys.SKIPPED).items()}
    received = {keys.text(u) for u in connection.smembers(keys.RECEIVED)}
    moving = set()
    for key in (keys.SPOOLED, keys.CONVERTING, keys.QUEUED):
        moving |= {keys.text(u) for u in connection.smembers(key)}
    counters = {keys.text(k): int(v) for k, v in connection.hgetall(keys.COUNTERS).items()}
    finals = embedded | set(failed) | set(skipped)
    in_ledger = finals | moving
    not_embedded = {u: f"failed {failed[u]}" for u in acked if u in failed}
    not_embedded |= {u: f"skipped {skipped[u]}" for u in acked if u in skipped}

    double_counted, mismatched = _series_check(connection, {i.series_uid for i in sent.values()})
    partials, orphans, spooled = _spool_check(daemon.state_dir / "spool", in_ledger)
    quarantine = daemon.state_dir / "quarantine"
    quarantined = {Spool.uid_of(p) for p in quarantine.glob(f"*{SUFFIX}")}
    stored = int(connection.hlen(keys.EMB_VECTORS))
    rework = None
    with contextlib.suppress(OSError, ValueError):
        rework = int(daemon.emulator_stats()["images_embedded"]) - stored
    return Verdict(
        sent=len(sent),
        acked=len(acked & set(sent)),
        embedded=len(embedded & set(sent)),
        lost=sorted(acked - finals),
        not_embedded=not_embedded,
        double_commits=counters.get("embedded", 0) - len(embedded),
        double_counted=double_counted,
        sum_mismatch=mismatched,
        partials=partials,
        orphans=orphans,
        unsent_in_ledger=sorted(in_ledger - set(sent)),
        missing_spool=sorted(acked - finals - spooled - quarantined),
        spool_deleted=sorted((acked & finals) - spooled - quarantined),
        retention_deleted=sum(
            int(line.get("files", 0))
            for line in daemon.log_lines()
            if line.get("event") == "retention.deleted"
        ),
        received_short=len(in_ledger - received),
        reconverted=counters.get("converted", 0) - len(in_ledger - set(skipped) - set(failed)),
        quarantined=len(quarantined),
        stored_images=stored,
        rework=rework,
        strays=daemon.strays(),
    )


def _series_check(connection: redis.Redis, series: set[str]) -> tuple[int, list[str]]:
    """(images counted beyond once, series whose sum is not that of their stored vectors)."""
    double = 0
    mismatched = []
    for uid in sorted(series):
        raw = cast(dict[bytes, bytes], connection.hgetall(keys.series_key(uid)))
        fields = {keys.text(k): v for k, v in raw.items()}
        counted = [name[2:] for name in fields if name.startswith("i:")]
        double += int(fields.get("count", 0)) - len(counted)
        if not counted:
            continue
        raws = cast(list[bytes | None], connection.hmget(keys.EMB_VECTORS, counted))
        vectors = [np.frombuffer(r, dtype="<f4").astype(np.float64) for r in raws if r is not None]
        total = np.frombuffer(fields["sum"], dtype="<f8") if "sum" in fields else None
        if total is None or len(vectors) != len(counted):
            mismatched.append(uid)
        elif not np.allclose(total, np.sum(vectors, axis=0), atol=1e-4):
            mismatched.append(uid)
    return double, mismatched


def _spool_check(root: Path, in_ledger: set[str]) -> tuple[list[str], list[str], set[str]]:
    """(partial files, spool files whose instance is in no ledger state, UIDs spooled)."""
    partials, orphans, spooled = [], [], set()
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            continue
        rel = str(path.relative_to(root))
        if path.parent.name == "tmp" or path.suffix != SUFFIX or path.parent == root:
            partials.append(rel)
            continue
        uid = Spool.uid_of(path)
        spooled.add(uid)
        if uid not in in_ledger:
            orphans.append(rel)
    return partials, orphans, spooled


def explain(daemon: ChaosDaemon, uid: str, log_lines: int = 12) -> str:
    """One instance's story for a report: its ledger record and the log lines naming it."""
    connection = daemon.redis()
    where = _where(connection, uid)
    raw = connection.hgetall(keys.instance_key(uid))
    record = {keys.text(k): keys.text(v) for k, v in raw.items()}
    job = record.get("job")
    status = keys.text(connection.hget(f"rq:job:{job}", "status") or b"-") if job else "-"
    log = daemon.log_path.read_text(errors="replace").splitlines()
    lines = [line for line in log if uid in line][-log_lines:]
    head = f"{uid}: states={where} job={job} job_status={status}"
    return "\n  ".join([head, *lines])


# -- scenarios ---------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    verdict: Verdict
    recovered_in_s: float | None
    seconds: float
    facts: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stories: list[str] = field(default_factory=list)

    def line(self) -> str:
        v = self.verdict
        recovered = "never" if self.recovered_in_s is None else f"{self.recovered_in_s:.1f}"
        facts = " ".join(f"{k}={v}" for k, v in self.facts.items())
        return (
            f"{self.scenario}: lost={len(v.lost)} duplicated={v.duplicated} "
            f"recovered_in_s={recovered} sent={v.sent} acked={v.acked} "
            f"embedded={v.embedded} rework={v.rework} reconverted={v.reconverted} "
            f"received_short={v.received_short} spool_deleted={len(v.spool_deleted)} "
            f"{facts} run_s={self.seconds:.0f}"
        )

    def problems(self) -> list[str]:
        found = [*self.verdict.problems(), *self.errors]
        if self.recovered_in_s is None:
            found.append("never all final")
        return found


def _conclude(
    scenario: str,
    daemon: ChaosDaemon,
    sender: PacsSender,
    since: float | None,
    started: float,
    timeout: float,
    facts: dict[str, Any],
    errors: list[str],
    watch: FinalWatch,
) -> Result:
    """Wait for the sender and for every acknowledged instance to be final, then judge."""
    if not sender.wait(timeout):
        errors.append("the sender was still sending at the timeout")
        sender.stop()
    at = wait_final(daemon, lambda: sorted(sender.log.acked()), timeout)
    if not wait_settled(daemon):
        errors.append("queue or dispatcher still busy 30 s after all were final")
    verdict = judge(daemon, sender)
    recovered = None if at is None else max(0.0, at - (since if since is not None else started))
    facts = {**facts, **_sender_facts(sender), **supervision_facts(daemon)}
    stories = [explain(daemon, uid) for uid in verdict.lost[:5]]
    stories += [f"{u}: {why}" for u, why in list(verdict.not_embedded.items())[:5]]
    stories += [f"sender: {note}" for note in sender.notes[:5]]
    errors = [*errors, *sender.errors]
    back = [(t, uid, why) for t, uid, why in watch.regressions if why.startswith("moved back")]
    facts["final_regressions"] = f"{len(back)}/{len(watch.regressions) - len(back)}"
    if back:
        errors.append(f"final state regressed (no Redis restart) for {len(back)} instances")
        for t, uid, why in back[:3]:
            stories.append(f"at +{t - started:.1f} s {why}: " + explain(daemon, uid))
    return Result(scenario, verdict, recovered, time.monotonic() - started, facts, errors, stories)


def supervision_facts(daemon: ChaosDaemon) -> dict[str, Any]:
    """From the daemon's log: children that died without being killed (exit code not -9),
    the longest restart pause the supervisor chose, and the C-STOREs refused, by reason."""
    lines = daemon.log_lines()
    exits = [line for line in lines if line.get("event") == "child.exited"]
    alone = Counter(str(line.get("role")) for line in exits if line.get("returncode") != -9)
    pause = max((float(line.get("restart_in_seconds", 0)) for line in exits), default=0.0)
    refused = Counter(
        str(line.get("reason")) for line in lines if line.get("event") == "store.refused"
    )
    return {
        "self_exits": _tally(alone),
        "max_restart_pause_s": pause,
        "refused": _tally(refused).replace(" ", "_"),
    }


def _tally(counts: Counter[str]) -> str:
    return "/".join(f"{key}:{n}" for key, n in sorted(counts.items())) or "0"


def _sender_facts(sender: PacsSender) -> dict[str, int]:
    s = sender.log.summary()
    return {"resent": s["resent"], "no_answer": s["no_answer"], "a7xx": s["a7xx"]}


def _settings(**extra: str) -> dict[str, str]:
    return {"QUEUE__LINGER_SECONDS": "0.3", "WORKERS__COUNT": "2", **extra}


def crash(
    workdir: Path,
    *,
    instances: int,
    studies: int,
    kills: int,
    roles: Sequence[str] = ("listen", "dispatch", "worker", "redis"),
    gaps: tuple[float, float] = (1.0, 3.0),
    send_seconds: float = 30.0,
    seed: int = 1,
    size: int = 128,
    timeout: float = 300.0,
) -> Result:
    """kill -9 of ``roles`` ``kills`` times at random moments while ``instances`` arrive (over
    about ``send_seconds``); every acknowledged instance must end embedded, once."""
    jobs = write_corpus(workdir / "corpus", instances, studies, size, seed)
    daemon = ChaosDaemon(
        workdir / "var", workdir / "daemon.log", **_settings(EMULATOR__LATENCY_MS="150")
    )
    with running(daemon):
        facts: dict[str, Any] = {"listener_in_run": daemon.listener_in_run()}
        if facts["listener_in_run"]:  # killing it would kill `run`: leave it alive
            roles = [r for r in roles if r != "listen"] or ["worker"]
        per_job = max(len(job) for job in jobs)
        sender = PacsSender(
            daemon.dicom_port,
            jobs,
            dcmtk_jobs=max(1, studies * 3 // 10),
            pace=send_seconds / per_job,
        )
        plan = Killer.plan_for(roles, kills, seed)
        killer = Killer(daemon, plan, gaps=gaps, seed=seed)
        started = time.monotonic()
        with FinalWatch(daemon) as watch:
            sender.start()
            killer.start()
            killer.join(timeout)
            killer.stop()
            facts["kills"] = _tally(Counter(k.role for k in killer.kills))
            facts["last_kill_at_s"] = round((killer.last or started) - started, 1)
            facts["acked_at_last_kill"] = len(sender.log.acked())
            result = _conclude(
                "crash", daemon, sender, killer.last, started, timeout, facts, killer.errors, watch
            )
    return _stopped(result, daemon)


def _stopped(result: Result, daemon: ChaosDaemon) -> Result:
    """After Ctrl-C: every process `run` had started must be gone."""
    left = daemon.family_alive()
    result.facts["clean_stop"] = not left
    if left:
        result.errors.append(f"processes left after Ctrl-C: {left}")
    return result


def faults(
    workdir: Path,
    *,
    instances: int,
    studies: int,
    outage_seconds: float,
    cold_start_seconds: float,
    seed: int = 2,
    size: int = 128,
    timeout: float = 600.0,
) -> Result:
    """30 % 429/503 with Retry-After, 5 % hangs past the read timeout, a cold start, and an
    outage once a quarter is embedded: every instance must end embedded, with no manual step."""
    jobs = write_corpus(workdir / "corpus", instances, studies, size, seed)
    settings = _settings(
        EMULATOR__RATE_429="0.15",
        EMULATOR__RATE_503="0.15",
        EMULATOR__RETRY_AFTER_SECONDS="1",
        EMULATOR__RATE_HANG="0.05",
        EMULATOR__HANG_SECONDS="120",
        EMULATOR__COLD_START_SECONDS=f"{cold_start_seconds:g}",
        EMULATOR__SEED=str(seed),
        ENDPOINT__READ_TIMEOUT="3",
        ENDPOINT__MAX_IN_FLIGHT="2",
    )
    daemon = ChaosDaemon(workdir / "var", workdir / "daemon.log", **settings)
    with running(daemon), FinalWatch(daemon) as watch:
        sender = PacsSender(daemon.dicom_port, jobs, dcmtk_jobs=max(1, studies // 3))
        started = time.monotonic()
        sender.start()
        connection = daemon.redis()
        daemon.wait_for(
            lambda: connection.scard(keys.EMBEDDED) >= instances // 4, timeout, "a quarter embedded"
        )
        daemon.outage(outage_seconds)
        outage_end = time.monotonic() + outage_seconds
        result = _conclude("faults", daemon, sender, outage_end, started, timeout, {}, [], watch)
        stats = daemon.emulator_stats()
    injected = stats.get("injected", {})
    result.facts.update(
        {
            f"injected_{k}": injected[k]
            for k in ("429", "503", "hang", "cold_start", "outage")
            if k in injected
        }
    )
    return _stopped(result, daemon)


@contextlib.contextmanager
def tmpfs(path: Path, megabytes: int) -> Iterator[Path]:
    """A tmpfs of ``megabytes`` mounted at ``path`` (root only), unmounted on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0700", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def overload(
    workdir: Path,
    *,
    associations: int,
    per_association: int,
    spool_mb: int | None,
    watermark_mb: int = 8,
    room_mb: float = 4.0,
    size: int = 128,
    seed: int = 3,
    timeout: float = 300.0,
) -> Result:
    """``associations`` at once, ``per_association`` instances. With ``spool_mb``: the spool is
    a tmpfs that size, filled by a ballast file to ``room_mb`` above the watermark, so the
    listener answers 0xA700; once it has, the ballast goes and sending must resume and finish.
    The listener's peak RSS is reported."""
    jobs = write_corpus(
        workdir / "corpus", associations * per_association, associations, size, seed
    )
    state = workdir / "var"
    settings = _settings(LISTENER__MIN_FREE_DISK_MB=str(watermark_mb))
    with contextlib.ExitStack() as stack:
        if spool_mb is not None:
            stack.enter_context(tmpfs(state / "spool", spool_mb))
        daemon = ChaosDaemon(state, workdir / "daemon.log", **settings)
        stack.enter_context(running(daemon))
        ballast = state / "spool" / "ballast"
        if spool_mb is not None:
            free = shutil.disk_usage(ballast.parent).free
            fill = int(free - (watermark_mb + room_mb) * 1024 * 1024)
            with open(ballast, "wb") as handle:
                os.posix_fallocate(handle.fileno(), 0, fill)
        sampler = stack.enter_context(RssSampler(daemon))
        watch = stack.enter_context(FinalWatch(daemon))
        sender = PacsSender(
            daemon.dicom_port, jobs, dcmtk_jobs=associations // 4, pause=0.5, max_pause=2.0
        )
        started = time.monotonic()
        sender.start()
        freed_at = None
        errors: list[str] = []
        facts: dict[str, Any] = {"spool_mb": spool_mb}
        if spool_mb is not None:
            daemon.wait_for(lambda: sender.log.first(out_of_resources) is not None, 120, "0xA700")
            time.sleep(2.0)  # refused for a while: the sender keeps retrying meanwhile
            facts["tmp_files_when_full"] = sum(1 for _ in (state / "spool" / "tmp").iterdir())
            facts["a7xx_before_free"] = sender.log.count(out_of_resources)
            ballast.unlink()
            freed_at = time.monotonic()
        result = _conclude(
            "overload", daemon, sender, freed_at, started, timeout, facts, errors, watch
        )
        if freed_at is not None:  # an answer already on its way when the space freed aside
            result.facts["a7xx_after_free"] = sender.log.count(out_of_resources, freed_at + 1)
    result.facts["listener_rss_peak_mb"] = round(sampler.peak_kb / 1024)
    result.facts["listener_tree_rss_peak_mb"] = round(sampler.peak_tree_kb / 1024)
    return _stopped(result, daemon)
