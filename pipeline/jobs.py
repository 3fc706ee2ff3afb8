"""The embed job's payload: what crosses Redis from the listener host to any worker host.

PNG bytes, UIDs and the few non-PHI header fields verdicts need — never patient data. Plain dicts
on the wire (rq pickles them), built and read only here so both sides agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from rq import Queue, Retry

from pipeline.uids import job_id

if TYPE_CHECKING:  # workers need not import the conversion stack to read a payload
    from pipeline.convert.options import ConvertedImage

EMBED_QUEUE = "embed"
#: The job function, by import path: the listener enqueues it without importing worker code.
EMBED_FUNC = "workers.jobs.embed_batch"
JOB_PREFIX = "embed"


@dataclass(frozen=True)
class ImageItem:
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part: str
    frame: int
    png: bytes


def items_of(image: ConvertedImage) -> list[ImageItem]:
    """One queue item per embedded frame of a converted instance."""
    return [
        ImageItem(
            sop_instance_uid=image.sop_instance_uid,
            series_instance_uid=image.series_instance_uid,
            study_instance_uid=image.study_instance_uid,
            modality=image.modality,
            body_part=image.body_part,
            frame=frame,
            png=png,
        )
        for frame, png in zip(image.frames, image.pngs, strict=True)
    ]


@dataclass(frozen=True)
class EmbedBatch:
    """Images of one series, at most ``batch_size`` of them and ``batch_max_bytes`` of PNG."""

    series_instance_uid: str
    items: tuple[ImageItem, ...]

    @property
    def sop_uids(self) -> list[str]:
        return [item.sop_instance_uid for item in self.items]

    @property
    def png_bytes(self) -> int:
        return sum(len(item.png) for item in self.items)

    def to_payload(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "items": [asdict(item) for item in self.items],
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> EmbedBatch:
        return cls(
            series_instance_uid=payload["series_instance_uid"],
            items=tuple(ImageItem(**item) for item in payload["items"]),
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
    """Put one batch on the embed queue under an id derived from its UIDs; return the id.

    ``retry_intervals`` (seconds) are rq's waits between job retries; tests pass ``[0]``.
    """
    jid = job_id(JOB_PREFIX, batch.series_instance_uid, batch.sop_uids)
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
