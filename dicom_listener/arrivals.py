"""The hand-off from a node's listener processes to its dispatcher: a Redis list of SOP UIDs.

A C-STORE handler adds an instance once it is durable in the spool, and answers at once; a
thread of the listener writes whatever was added meanwhile in one round trip (RPUSH), so an
answer never waits for Redis, and one association's instances cost one round trip per batch,
not per instance. The dispatcher — its own process, so conversion never holds the GIL that the
associations need — takes the list every loop (:func:`take`).

Nothing is lost in between. A Redis outage only delays the hand-off: the UIDs stay in memory,
and the back-pressure that bounds them answers 0xA700 past ``listener.max_backlog``. A crash
loses at most what was in memory, and that is in the spool: a starting listener asks its node's
dispatcher, with its first write, to reconcile the spool against the ledger, which finds it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import redis
import structlog

from pipeline.keys import arrivals_key, backlog_key, reconcile_key, text

log = structlog.get_logger(__name__)

#: How long the writer waits for arrivals before it refreshes the dispatcher's backlog anyway.
REFRESH_SECONDS = 1.0
#: How long the writer lets arrivals gather once one came: a round trip (and a turn of the GIL
#: the associations' threads wait for) per few instances rather than per instance.
LINGER_SECONDS = 0.005
#: Pauses after a failed write, doubling: Redis may be restarting.
FIRST_RETRY_SECONDS, MAX_RETRY_SECONDS = 0.2, 5.0
#: How long a dispatcher's published backlog stands without being renewed.
BACKLOG_TTL_SECONDS = 15


class ArrivalLog:
    """The listener's side: :meth:`add` from the handlers, a thread that writes batches."""

    def __init__(self, connection: redis.Redis, node: str) -> None:
        self.redis = connection
        self.key = arrivals_key(node)
        self.node = node
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        #: Instances the node holds beyond this process: on the list, and in the dispatcher.
        self.downstream = 0
        self._reconcile_asked = False  # with the first write that succeeds
        self._thread = threading.Thread(target=self._run, name="arrivals", daemon=True)

    def add(self, sop_uid: str) -> None:
        with self._lock:
            self._pending.append(sop_uid)
        self._wake.set()

    def backlog(self) -> int:
        """Instances this node accepted and has not handed to the queue yet, as far as this
        process knows: its own unwritten ones, and the node's last reported."""
        return len(self._pending) + self.downstream

    def start(self) -> None:
        self._wake.set()  # the reconciliation request goes out at once
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is left (best effort: what a Redis outage keeps, reconciliation finds)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        pause = FIRST_RETRY_SECONDS
        while True:
            if self._wake.wait(REFRESH_SECONDS):
                self._stop.wait(LINGER_SECONDS)
            self._wake.clear()
            stopping = self._stop.is_set()
            with self._lock:
                batch, self._pending = self._pending, []
            try:
                self._write(batch)
                pause = FIRST_RETRY_SECONDS
            except redis.RedisError as exc:
                with self._lock:
                    self._pending[:0] = batch  # oldest first, ahead of what came meanwhile
                pending = len(self._pending)
                log.warning("arrivals.unwritten", pending=pending, error=type(exc).__name__)
                if stopping or self._stop.wait(pause):
                    return
                pause = min(pause * 2, MAX_RETRY_SECONDS)
                self._wake.set()
                continue
            if stopping:
                return

    def _write(self, batch: Sequence[str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        if not self._reconcile_asked:
            # This process just started: what an earlier one held in memory is only in the spool.
            pipe.set(reconcile_key(self.node), 1)
        if batch:
            pipe.rpush(self.key, *batch)
        pipe.llen(self.key)
        pipe.get(backlog_key(self.node))
        *_, listed, held = pipe.execute()
        self._reconcile_asked = True
        self.downstream = int(listed) + int(held or 0)


def take(connection: redis.Redis, node: str, limit: int) -> tuple[list[str], bool]:
    """The dispatcher's side: up to ``limit`` spooled instances, oldest first, and whether a
    listener asked for a reconciliation since the last call (both taken, in one round trip)."""
    key = arrivals_key(node)
    pipe = connection.pipeline(transaction=True)
    pipe.lrange(key, 0, limit - 1)
    pipe.ltrim(key, limit, -1)
    pipe.getdel(reconcile_key(node))
    uids, _, asked = pipe.execute()
    return [text(uid) for uid in uids], asked is not None


def listed(connection: redis.Redis, node: str) -> set[str]:
    """The SOP UIDs on the arrival log now (bounded by the listeners' back-pressure)."""
    return {text(uid) for uid in connection.lrange(arrivals_key(node), 0, -1)}


def publish_backlog(connection: redis.Redis, node: str, backlog: int) -> None:
    """The dispatcher's side, with each report; a Redis outage is only logged (the listeners
    keep the last value they read)."""
    try:
        connection.set(backlog_key(node), backlog, ex=BACKLOG_TTL_SECONDS)
    except redis.RedisError as exc:
        log.debug("arrivals.backlog_unpublished", error=type(exc).__name__)
