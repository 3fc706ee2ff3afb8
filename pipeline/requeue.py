"""Doing again what an operator asks for: a dead letter, a study's latest version, a failed
instance.

``pacs-embed requeue`` and the admin's ``POST /requeue`` call these. A dead letter is put back
on the push queue as the push it was, and leaves the dead letters; a study's latest completed
version is pushed again to every configured sink even where it was delivered (the same SR SOP
Instance UID and webhook idempotency key: a receiver that has it keeps one copy).

A failed instance is converted and embedded again from its file, which only the listener host
has (in the spool, or quarantined): the request is put on a Redis list
(``pe:requeue:instances``) that each listener's dispatcher drains every loop
(:func:`requested_instances`), moving a quarantined copy back into the spool and handing it on
as a new arrival. Its failure goes away as it is spooled again; a second failure comes back
with its own reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
from rq import Queue

from pipeline import keys
from pipeline.deadletters import DeadLetters
from pipeline.jobs import enqueue_push, push_queue
from pipeline.keys import text
from pipeline.ledger import Ledger
from pipeline.studies import Studies

#: Requested instances a dispatcher takes per loop.
TAKE_LIMIT = 100


class NothingToRequeue(LookupError):
    """The dead letter or study named is unknown (or has no completed version yet, or there is
    no sink to push to); the instance named has not failed."""


def requeue_dead_letter(connection: redis.Redis, letter_id: str) -> str:
    """Put dead letter ``letter_id`` back on the push queue; return the push job's id."""
    letter = DeadLetters(connection).take(letter_id)
    if letter is None:
        raise NothingToRequeue(f"no dead letter {letter_id!r}")
    study = letter.study_instance_uid
    queue = Queue(push_queue(Studies(connection).node_of(study)), connection=connection)
    return enqueue_push(queue, letter.sink, study, letter.version, force=True)


def requeue_study(
    connection: redis.Redis, studies: Studies, sinks: Sequence[str], study: str
) -> list[str]:
    """Push ``study``'s latest completed version to every sink again; return the job ids."""
    version = studies.completed_version(study)
    if version == 0:
        raise NothingToRequeue(f"study {study!r} has no completed version")
    if not sinks:
        raise NothingToRequeue("no sink is configured")
    queue = Queue(push_queue(studies.node_of(study)), connection=connection)
    return [enqueue_push(queue, sink, study, version, force=True) for sink in sinks]


def requeue_instance(connection: redis.Redis, ledger: Ledger, sop_uid: str) -> None:
    """Ask the listener to convert and embed failed instance ``sop_uid`` again."""
    [final], [settled] = ledger.final([sop_uid]), ledger.settled([sop_uid])
    if not final or settled:  # failed is the final state that is not settled
        raise NothingToRequeue(f"instance {sop_uid!r} has not failed")
    connection.rpush(keys.REQUEUE_INSTANCES, sop_uid)


def requested_instances(connection: redis.Redis, limit: int = TAKE_LIMIT) -> list[str]:
    """Take up to ``limit`` requested instances, oldest first (each taken by one listener)."""
    pipe = connection.pipeline(transaction=True)
    pipe.lrange(keys.REQUEUE_INSTANCES, 0, limit - 1)
    pipe.ltrim(keys.REQUEUE_INSTANCES, limit, -1)
    return [text(uid) for uid in pipe.execute()[0]]
