"""Spooled instance -> PNG (process pool) -> batches per series -> embed jobs on the queue.

One thread owns all of this: it takes what the node's listener processes spooled (their arrival
log, :mod:`.arrivals`) and paths from reconciliation,
keeps the process pool busy with a bounded number of conversions, groups converted images by
series and enqueues a batch when it is full or the series has been quiet for ``linger_seconds``.
Memory stays bounded: conversion pauses while the embed queue is deeper than ``max_queued_jobs``,
and the handlers refuse new instances (0xA700) while the backlog here is over its bound.

Crash-safety comes from the spool, not from here: anything in flight when the process dies is
found again by reconciliation at the next start.

Instances an operator asked to be done again (``pacs-embed requeue --instance``, POST
/requeue: ``requested``) are taken each loop: a quarantined copy is moved back into the spool
and the instance is handed on as if it had just arrived.

One bad item never blocks the others: a batch the queue refuses for anything but a Redis outage
is quarantined with the reason, and the loop goes on. A loop that keeps failing (Redis away) is
reported by :meth:`Dispatcher.health`, which ``/readyz`` and ``/status`` show.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import multiprocessing
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import redis
import structlog
from pydantic import Field

from dicom_listener.peek import peek_study
from dicom_listener.spool import Spool
from pipeline.convert import ConvertedImage, ConvertOptions, convert_file
from pipeline.convert.fields import checked_uid
from pipeline.errors import ConversionError, SkippedError
from pipeline.jobs import EmbedBatch, ImageItem, items_of, split
from pipeline.ledger import Ledger, Stage
from pipeline.lifetime import pool_process_init
from pipeline.logs import withhold_quoted
from pipeline.sections import QueueSettings

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = structlog.get_logger(__name__)

#: Characters of a failure's detail kept.
MAX_DETAIL = 2000

#: How often the loop reports its health (see pipeline/health.py).
REPORT_SECONDS = 2.0

Enqueue = Callable[[EmbedBatch], str]
QueueDepth = Callable[[], int]
#: Told which instances (study UID, SOP UID) were spooled: pipeline.studies.Studies.arrived.
Arrived = Callable[[Sequence[tuple[str, str]]], None]
#: Told each conversion's outcome (converted, skipped, failed) and its seconds from submission
#: to the pool to its result: pipeline.stage_metrics.ListenerMetrics.converted (no I/O).
Converted = Callable[[str, float], None]
#: Submits every unfinished spooled instance whose SOP UID is not in the set given:
#: :func:`dicom_listener.reconcile.reconcile`, bound to the spool.
Reconcile = Callable[[set[str], Callable[[Path], None]], object]


@dataclass
class _Series:
    items: list[ImageItem] = field(default_factory=list)
    last_seen: float = 0.0


class DispatchLimits(QueueSettings):
    """The [queue] section as the dispatcher applies it, plus how many conversions it keeps in
    flight (the listener gives twice ``convert.processes``: one converting, one waiting each)."""

    in_flight: int = Field(default=4, ge=1)

    @classmethod
    def from_settings(cls, settings: Settings) -> DispatchLimits:
        return cls(**dict(settings.queue), in_flight=2 * settings.convert.processes)


class Dispatcher:
    def __init__(
        self,
        *,
        spool: Spool,
        ledger: Ledger,
        enqueue: Enqueue,
        queue_depth: QueueDepth,
        options: ConvertOptions,
        limits: DispatchLimits,
        processes: int,
        log_settings: tuple[str, str] = ("info", "json"),
        report: Callable[[dict[str, object]], None] | None = None,
        arrived: Arrived | None = None,
        forget: Callable[[list[str]], int] = lambda _uids: 0,
        requested: Callable[[], list[str]] | None = None,
        converted: Converted = lambda _outcome, _seconds: None,
        node: str | None = None,
        spooled: Callable[[], list[str]] | None = None,
        reconcile: Reconcile | None = None,
    ) -> None:
        """``spooled``: takes the SOP UIDs that C-STOREs spooled since the last call;
        ``reconcile``: submits the unfinished spooled instances but those it is told to skip,
        run on this loop when asked (:meth:`request_reconcile`)."""
        self.node = node  # the listener node whose spool this is, recorded per instance
        self.report = report
        self.converted = converted
        self.requested = requested
        self.spooled = spooled
        self.reconcile = reconcile
        self._reconcile_wanted = threading.Event()
        self.arrived = arrived
        self.forget = forget
        #: path -> (digest, study UID, written by a C-STORE just now)
        self._arriving: dict[Path, tuple[str, str | None, bool]] = {}
        self._arrivals: list[tuple[str, str]] = []  # read, not yet told (kept over an outage)
        self.spool = spool
        self.ledger = ledger
        self.enqueue = enqueue
        self.queue_depth = queue_depth
        self.options = options
        self.limits = limits
        self.inbox: queue.Queue[tuple[Path, bool]] = queue.Queue()
        self._waiting: deque[Path] = deque()  # taken from the inbox, marked spooled
        self._pending: dict[str, _Series] = {}
        self._futures: dict[cf.Future[ConvertedImage], Path] = {}
        self._submitted: dict[cf.Future[ConvertedImage], float] = {}  # when (monotonic)
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._failing_since: float | None = None
        self._last_error = ""
        # spawn: never fork a process that runs pynetdicom's threads; and unlike forkserver,
        # the pool processes are our own children, so they can die with us.
        self._pool = cf.ProcessPoolExecutor(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=pool_process_init,
            initargs=(os.getpid(), *log_settings),
        )
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)

    # -- called from other threads -------------------------------------------------------------
    def submit(self, path: Path, *, received: bool = False) -> None:
        """Hand on a spooled instance; ``received``: a copy a C-STORE just wrote (not one found
        in the spool by reconciliation or an operator's requeue)."""
        self._idle.clear()
        self.inbox.put((path, received))

    def request_reconcile(self) -> None:
        """Reconcile the spool on the next loop (the dispatcher started, or a listener did)."""
        self._reconcile_wanted.set()

    def held(self) -> set[str]:
        """SOP UIDs somewhere in this dispatcher (read, waiting, converting, in a batch being
        filled): not stuck, whatever the ledger says (``reconcile.Sweeper``)."""
        paths = [*list(self._arriving), *list(self._waiting), *list(self._futures.values())]
        pending = [
            item.image.sop_instance_uid for s in list(self._pending.values()) for item in s.items
        ]
        return {Spool.uid_of(path) for path in paths} | set(pending)

    def backlog(self) -> int:
        """Instances accepted but not yet handed to the queue."""
        pending = sum(len(series.items) for series in list(self._pending.values()))
        waiting = len(self._waiting) + len(self._arriving)
        return self.inbox.qsize() + waiting + len(self._futures) + pending

    def health(self) -> dict[str, object]:
        """``ok`` False while the loop keeps failing; the error names the exception type only."""
        since = self._failing_since
        return {
            "ok": since is None,
            "failing_for_seconds": round(time.monotonic() - since, 1) if since else 0.0,
            "last_error": self._last_error,
            "backlog": self.backlog(),
            "at": time.time(),
        }

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wait_idle(self, timeout: float) -> bool:
        """For tests and clean shutdown: True once nothing is waiting or pending here."""
        return self._idle.wait(timeout)

    # -- the dispatcher thread ------------------------------------------------------------------
    def _run(self) -> None:
        reported = 0.0
        while not self._stop.is_set():
            try:
                if self.report is not None and time.monotonic() - reported >= REPORT_SECONDS:
                    reported = time.monotonic()
                    self.report(self.health())
                self._requeue()
                self._take()
                self._reconcile()
                self._announce()
                self._fill()
                self._collect(timeout=0.1)
                self._flush()
                if not self.backlog():
                    self._idle.set()
                self._failing_since = None
            except Exception as exc:  # Redis down, a bug: log, back off, keep going; the spool
                log.exception("dispatcher.error")  # holds everything
                self._last_error = type(exc).__name__
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                self._stop.wait(1.0)

    def _requeue(self) -> None:
        """Submit the instances an operator asked for again (pipeline/requeue.py): from the
        spool, or moved back from quarantine. One whose file is on neither is logged and
        dropped (its failure stands)."""
        if self.requested is None:
            return
        for uid in self.requested():
            try:
                path = self.spool.restore(uid)
            except OSError as exc:
                log.warning("requeue.failed", sop_instance_uid=uid, error=type(exc).__name__)
                continue
            if path is None:
                log.warning("requeue.missing", sop_instance_uid=uid)
                continue
            log.info("requeue.resubmitted", sop_instance_uid=uid)
            self.submit(path)

    def _reconcile(self) -> None:
        """Submit what the spool holds unfinished, but what this loop already holds or was
        handed: on this thread, between takes, so nothing is in passage and nothing is done
        twice. Asked again if it fails (Redis away): the loop backs off and retries."""
        if self.reconcile is None or not self._reconcile_wanted.is_set():
            return
        self._reconcile_wanted.clear()
        inbox = {Spool.uid_of(path) for path, _received in list(self.inbox.queue)}
        try:
            self.reconcile(self.held() | inbox, self.submit)
        except Exception:
            self._reconcile_wanted.set()
            raise

    def _take(self) -> None:
        """Record what the handlers submitted: ``spooled`` in the ledger with the digest of its
        bytes, and its arrival in its study (``_announce``).

        A resend whose bytes equal those already embedded or skipped — after retention deleted
        the first copy — is dropped (identical, so nothing to redo); a resend whose bytes differ
        is a correction: its stored images are forgotten so it is embedded again, and its
        arrival opens a new version of its study. Paths wait in ``_arriving`` until this
        succeeds, so a Redis error loses none of them.
        """
        if self.spooled is not None:
            for uid in self.spooled():
                self.inbox.put((self.spool.path_for(uid), True))
        while True:
            try:
                path, received = self.inbox.get_nowait()
            except queue.Empty:
                break
            received = received or self._arriving.get(path, ("", None, False))[2]
            self._arriving[path] = (*read_arrival(path), received)
        if not self._arriving:
            return
        paths = list(self._arriving)
        uids = [Spool.uid_of(path) for path in paths]
        previous = self.ledger.digests(uids)
        settled = self.ledger.settled(uids)
        keep: dict[Path, str] = {}
        corrected: list[str] = []
        for path, uid, before, done in zip(paths, uids, previous, settled, strict=True):
            digest, study, received = self._arriving[path]
            if before == digest and done:
                # Final already, with these very bytes: nothing to redo. A copy a C-STORE just
                # wrote is an identical resend after retention deleted the first: it goes too.
                # The spool's own copy (reconciliation, a requeue) stays where it is.
                if received:
                    path.unlink(missing_ok=True)
                    self.ledger.count("resends")
                    log.info("store.resend_identical", sop_instance_uid=uid)
                continue
            if before is not None and before != digest:
                corrected.append(uid)
            keep[path] = uid
            if study is not None and self.arrived is not None:
                self._arrivals.append((study, uid))
        if corrected:
            forgotten = self.forget(corrected)
            log.info("instance.corrected", instances=len(corrected), images_forgotten=forgotten)
        digests = {uid: self._arriving[p][0] for p, uid in keep.items()}
        self.ledger.spooled(keep.values(), digests, self.node)
        self._waiting.extend(keep)
        self._arriving.clear()

    def _announce(self) -> None:
        """Tell the study versions what arrived (after the ledger knows it; retried on error)."""
        if self._arrivals and self.arrived is not None:
            self.arrived(self._arrivals)
            self._arrivals = []

    def _fill(self) -> None:
        if self.queue_depth() >= self.limits.max_queued_jobs:
            return  # back-pressure: let the workers catch up
        started: list[Path] = []
        while self._waiting and len(self._futures) + len(started) < self.limits.in_flight:
            started.append(self._waiting.popleft())
        if not started:
            return
        try:
            self.ledger.converting(Spool.uid_of(path) for path in started)
        except Exception:
            self._waiting.extendleft(reversed(started))
            raise
        for path in started:
            future = self._pool.submit(convert_file, path, self.options)
            self._futures[future] = path
            self._submitted[future] = time.monotonic()

    def _collect(self, timeout: float) -> None:
        if not self._futures:
            self._stop.wait(timeout)
            return
        done, _ = cf.wait(list(self._futures), timeout=timeout, return_when=cf.FIRST_COMPLETED)
        images: list[tuple[Path, ConvertedImage]] = []
        try:
            for future in done:
                path = self._futures.pop(future)
                submitted = self._submitted.pop(future, time.monotonic())
                try:
                    outcome = self._settle(path, future)
                except Exception:
                    self._waiting.append(path)
                    raise
                if outcome == "converted":
                    images.append((path, future.result()))
                self.converted(outcome, time.monotonic() - submitted)
            self._record(images)
        except Exception:
            # Redis unreachable mid-way: convert these again later rather than hold results
            # whose ledger entries may be missing. The loop backs off on the raise.
            self._waiting.extend(path for path, _ in images)
            raise

    def _settle(self, path: Path, future: cf.Future[ConvertedImage]) -> str:
        """Record a failed or skipped conversion; returns the outcome: converted (recorded by
        :meth:`_record`, with the others that finished together), skipped or failed."""
        sop_uid = Spool.uid_of(path)
        try:
            future.result()
        except SkippedError as exc:
            self.ledger.skipped(sop_uid, str(exc))
            log.info("convert.skipped", sop_instance_uid=sop_uid, reason=str(exc))
            return "skipped"
        except ConversionError as exc:
            self._quarantine(sop_uid, path, str(exc), exc.detail)
            return "failed"
        except Exception as exc:  # a crashed pool process, a bug: quarantine, never lose silently
            self._quarantine(sop_uid, path, "conversion crashed", f"{type(exc).__name__}: {exc}")
            return "failed"
        return "converted"

    def _record(self, images: Sequence[tuple[Path, ConvertedImage]]) -> None:
        """Record conversions in one transaction (one round trip, one fsync of Redis's
        append-only file, however many finished together), then add their images to their
        series' batches."""
        if not images:
            return
        self.ledger.converted_many(
            [
                (
                    Spool.uid_of(path),
                    {**image.images[0].instance_fields(), "decoder": image.decoder},
                    image.frames,
                )
                for path, image in images
            ]
        )
        for _path, image in images:
            series = self._pending.setdefault(image.images[0].series_instance_uid, _Series())
            series.last_seen = time.monotonic()
            series.items.extend(items_of(image))

    def _quarantine(self, sop_uid: str, path: Path, reason: str, detail: str = "") -> None:
        # The detail is a library's text (decoder errors); it goes to Redis and the log, so any
        # value it quotes is withheld. Our own reasons never quote a value.
        detail = withhold_quoted(detail, MAX_DETAIL)
        self.spool.quarantine(sop_uid, path, reason, detail)
        self.ledger.failed(sop_uid, Stage.CONVERT, reason, detail)
        log.warning("convert.quarantined", sop_instance_uid=sop_uid, reason=reason, detail=detail)

    def _flush(self) -> None:
        now = time.monotonic()
        for uid in list(self._pending):
            series = self._pending[uid]
            batches = split(series.items, self.limits.batch_size, self.limits.batch_max_bytes)
            arriving = now - series.last_seen < self.limits.linger_seconds
            if arriving and batches and len(batches[-1]) < self.limits.batch_size:
                batches = batches[:-1]  # the series may still fill its last batch
            for items in batches:
                self._send(EmbedBatch(uid, tuple(items)))
                series.items = series.items[len(items) :]
            if not series.items:
                del self._pending[uid]

    def _send(self, batch: EmbedBatch) -> None:
        """Enqueue one batch; a batch the queue refuses (not an outage) is quarantined."""
        try:
            job_id = self.enqueue(batch)
        except redis.RedisError:
            raise  # an outage: keep the batch, the loop backs off and tries again
        except Exception as exc:
            for sop_uid in batch.sop_uids:
                path = self.spool.path_for(sop_uid)
                self._quarantine(sop_uid, path, "cannot enqueue", f"{type(exc).__name__}: {exc}")
            return
        self.ledger.queued(batch.sop_uids, job_id)
        log.info(
            "batch.enqueued",
            series_instance_uid=batch.series_instance_uid,
            job_id=job_id,
            images=len(batch.items),
            png_bytes=batch.png_bytes,
        )


def read_arrival(path: Path) -> tuple[str, str | None]:
    """(digest of the spooled bytes, Study Instance UID if conversion would accept it) — an
    instance without one is quarantined by conversion and belongs to no study version."""
    try:
        data = path.read_bytes()
    except OSError:
        return "", None  # gone (a resend settled it): conversion reports it
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:  # bounded, as the C-STORE handler reads: a deflate bomb is not inflated here
        header = peek_study(data)
        return digest, checked_uid(header, "StudyInstanceUID", "Study Instance UID")
    except Exception:  # unreadable or unsafe: conversion quarantines it and says why
        return digest, None
