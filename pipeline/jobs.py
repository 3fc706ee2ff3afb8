"""The embed job's payload: what crosses Redis from the listener host to any worker host.

Per image, its record (pipeline/records.py: UIDs, frame and the few non-PHI header fields verdicts
need — never patient data) and its PNG bytes. Plain dicts on the wire (rq pickles them), one per
image, the record's fields plus ``png``; built and read only here so both sides agree, and read
tolerantly, since listener and workers may run different versions during an upgrade.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rq import Queue, Retry

from pipeline.keys import DEFAULT_NODE
from pipeline.records import ImageRecord
from pipeline.uids import job_id, token

if TYPE_CHECKING:  # workers need not import the conversion stack to read a payload
    from pipeline.convert.options import ConvertedImage

EMBED_QUEUE = "embed"
#: The job function, by import path: the listener enqueues it without importing worker code.
EMBED_FUNC = "workers.jobs.embed_batch"
JOB_PREFIX = "embed"


@dataclass(frozen=True)
class ImageItem:
    """One image on its way to a worker: its record, and its PNG beside it."""

    image: ImageRecord
    png: bytes


def items_of(converted: ConvertedImage) -> list[ImageItem]:
    """One queue item per embedded frame of a converted instance."""
    return [
        ImageItem(image, png) for image, png in zip(converted.images, converted.pngs, strict=True)
    ]


@dataclass(frozen=True)
class EmbedBatch:
    """Images of one series, at most ``batch_size`` of them and ``batch_max_bytes`` of PNG.

    Frames of one instance may span several batches.
    """

    series_instance_uid: str
    items: tuple[ImageItem, ...]

    @property
    def images(self) -> list[ImageRecord]:
        return [item.image for item in self.items]

    @property
    def sop_uids(self) -> list[str]:
        """The instances the batch holds frames of, each once, in order."""
        return list(dict.fromkeys(item.image.sop_instance_uid for item in self.items))

    @property
    def png_bytes(self) -> int:
        return sum(len(item.png) for item in self.items)

    def to_payload(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "items": [{**item.image.to_dict(), "png": item.png} for item in self.items],
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> EmbedBatch:
        return cls(
            series_instance_uid=payload["series_instance_uid"],
            items=tuple(
                ImageItem(ImageRecord.from_dict(item), item["png"]) for item in payload["items"]
            ),
        )


def split(items: Sequence[ImageItem], max_count: int, max_bytes: int) -> list[list[ImageItem]]:
    """Pack items, in order, into batches capped by count and by PNG bytes (one image may exceed
    the byte cap alone: it then travels alone)."""
    batches: list[list[ImageItem]] = []
    current: list[ImageItem] = []
    size = 0
    for item in items:
        if current and (len(current) >= max_count or size + len(item.png) > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += len(item.png)
    if current:
        batches.append(current)
    return batches


#: Waits between retries of a job whose endpoint calls kept failing transiently (the client has
#: already retried within the call): minutes, so a cold start or an outage can pass.
RETRY_INTERVALS = [10, 30, 90, 300, 900]


def enqueue_batch(
    queue: Queue,
    batch: EmbedBatch,
    *,
    timeout: int,
    retries: int,
    retry_intervals: Sequence[int] = RETRY_INTERVALS,
) -> str:
    """Put one batch on the embed queue under an id derived from its images; return the id.

    ``retry_intervals`` (seconds) are rq's waits between job retries; tests pass ``[0]``.
    """
    # From the image keys, not the SOP UIDs: batches holding other frames of the same instances
    # are other jobs (a single-frame image's key is its SOP UID, so those ids are unchanged).
    jid = job_id(JOB_PREFIX, batch.series_instance_uid, [image.key for image in batch.images])
    queue.enqueue_call(
        EMBED_FUNC,
        args=(batch.to_payload(),),
        job_id=jid,
        timeout=timeout,
        # The ledger is the record: a finished job (and its PNG payload) leaves Redis at once.
        result_ttl=0,
        failure_ttl=7 * 24 * 3600,
        retry=Retry(max=retries, interval=list(retry_intervals)) if retries else None,
        # rq logs the description: UIDs and counts only, never the payload.
        description=f"embed {len(batch.items)} images of series {batch.series_instance_uid}",
    )
    return jid


# -- the push queue: one job per (sink, study version), on the listener host -----------------


def push_queue(node: str) -> str:
    """The push queue of one listener node: its push service has the study's files."""
    return f"push-{node}"


#: Push queues are named ``push-<node>``.
PUSH_QUEUE_PREFIX = "push-"
#: The push queue of code that is given no node (tests, single-node tools).
PUSH_QUEUE = push_queue(DEFAULT_NODE)
#: The push job function, by import path (enqueued by the push service's completer).
PUSH_FUNC = "workers.jobs.push_version"

#: Waits between retries of a push a sink refused for now: a PACS down for maintenance or a
#: receiver being redeployed gets about an hour; then it is dead-lettered.
PUSH_RETRY_INTERVALS = [5, 15, 60, 300, 900, 1800]


def push_job_id(sink: str, study_uid: str, version: int) -> str:
    """The push's name, also its dead letter's: the same for a redo, so it is enqueued once."""
    return f"push-{sink}-{token(study_uid)}-v{version}"


def enqueue_push(
    queue: Queue,
    sink: str,
    study_uid: str,
    version: int,
    *,
    force: bool = False,
    retry_intervals: Sequence[int] = PUSH_RETRY_INTERVALS,
) -> str:
    """Put one push on the push queue; ``force`` re-sends a version the sink already has."""
    jid = push_job_id(sink, study_uid, version)
    queue.enqueue_call(
        PUSH_FUNC,
        args=(sink, study_uid, version),
        kwargs={"force": force},
        job_id=jid,
        timeout=600,
        result_ttl=0,
        failure_ttl=7 * 24 * 3600,
        retry=Retry(max=len(retry_intervals), interval=list(retry_intervals)),
        description=f"push version {version} of study {study_uid} to {sink}",
    )
    return jid
