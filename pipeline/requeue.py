"""Re-sending results an operator asks for: a dead letter, or a study's latest version.

``pacs-embed requeue`` (and, later, the admin's ``POST /requeue``) call these. A dead letter is
put back on the push queue as the push it was, and leaves the dead letters; a study's latest
completed version is pushed again to every configured sink even where it was delivered (the
same SR SOP Instance UID and webhook idempotency key: a receiver that has it keeps one copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
from rq import Queue

from pipeline.deadletters import DeadLetters
from pipeline.jobs import PUSH_QUEUE, enqueue_push
from pipeline.studies import Studies


class NothingToRequeue(LookupError):
    """The dead letter or study named is unknown (or has no completed version yet)."""


def requeue_dead_letter(connection: redis.Redis, letter_id: str) -> str:
    """Put dead letter ``letter_id`` back on the push queue; return the push job's id."""
    letter = DeadLetters(connection).take(letter_id)
    if letter is None:
        raise NothingToRequeue(f"no dead letter {letter_id!r}")
    queue = Queue(PUSH_QUEUE, connection=connection)
    return enqueue_push(queue, letter.sink, letter.study_instance_uid, letter.version, force=True)


def requeue_study(
    connection: redis.Redis, studies: Studies, sinks: Sequence[str], study: str
) -> list[str]:
    """Push ``study``'s latest completed version to every sink again; return the job ids."""
    version = studies.completed_version(study)
    if version == 0:
        raise NothingToRequeue(f"study {study!r} has no completed version")
    queue = Queue(PUSH_QUEUE, connection=connection)
    return [enqueue_push(queue, sink, study, version, force=True) for sink in sinks]
