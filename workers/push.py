"""One push: a study version's results, built and handed to one sink, recorded once delivered.

Runs on the listener host, because the SR copies the patient and study modules from the source
headers, which are only in the spool: nothing with patient data crosses Redis. The push job
(``workers.jobs.push_version``) calls :meth:`PushService.push`; its completer
(``workers.completer``) enqueues one per configured sink when a study version completes.

Exactly once per sink and version. The delivery is recorded (``pushed:<sink>`` in the study's
state) only after the sink took it, so a push killed between the two is redone — with the same
content under the same names: the SR and KOS keep their derived SOP Instance UIDs (the PACS
stores an instance it has once), the webhook its idempotency key (the receiver drops a repeat).
A version a sink already has is skipped; so is one a newer completed version supersedes (the
newer push carries everything, and names the last delivered SR as its predecessor).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import pydicom
import redis
import structlog

from pipeline import keys
from pipeline.deadletters import DeadLetters
from pipeline.errors import PermanentPushError
from pipeline.jobs import push_job_id
from pipeline.ledger import Ledger
from pipeline.records import image_key
from pipeline.results import Algorithm, Reference, ResultIdentity, build_kos, build_report
from pipeline.sinks.webhook import encode_body
from pipeline.stage_metrics import StageMetrics
from pipeline.store import EmbeddingStore
from pipeline.studies import Studies
from pipeline.uids import digest
from pipeline.verdicts import GroupVerdict, InstanceVerdict, study_verdict

log = structlog.get_logger(__name__)

#: Sink names, as settings, job ids, counters and dead letters spell them.
DICOM, DICOMWEB, WEBHOOK = "dicom", "dicomweb", "webhook"


class Outcome(StrEnum):
    SENT = "sent"
    ALREADY = "already"  # the sink has this version (a redone job)
    SUPERSEDED = "superseded"  # a newer version completed: its push carries this one's results
    DEAD_LETTERED = "dead_lettered"


class DatasetSink(Protocol):
    """The DICOM and DICOMweb sinks: send datasets, raise a PushError if not taken."""

    def send(self, datasets: Sequence[pydicom.Dataset]) -> dict[str, int]: ...


class BodySink(Protocol):
    """The webhook sink: POST a signed body with its idempotency key."""

    def send(self, body: bytes, idempotency_key: str) -> None: ...


#: A source instance's header (no pixel data) from the spool; None once retention deleted it.
ReadHeader = Callable[[str], pydicom.Dataset | None]


@dataclass(frozen=True)
class Results:
    """What a study version's push carries."""

    study: GroupVerdict
    verdicts: list[InstanceVerdict]
    members: list[str]


class PushService:
    def __init__(
        self,
        *,
        connection: redis.Redis,
        studies: Studies,
        dead_letters: DeadLetters,
        ledger: Ledger,
        store: EmbeddingStore,
        read_header: ReadHeader,
        datasets: Mapping[str, DatasetSink],
        webhook: BodySink | None,
        algorithm: Algorithm,
        include_vectors: bool = False,
        delivered: Callable[[str, int], None] = lambda _study, _version: None,
        clock: Callable[[], float] = time.time,
        metrics: StageMetrics | None = None,
    ) -> None:
        self.redis = connection
        self.studies = studies
        self.dead_letters = dead_letters
        self.ledger = ledger
        self.store = store
        self.read_header = read_header
        self.datasets = dict(datasets)
        self.webhook = webhook
        self.algorithm = algorithm
        self.include_vectors = include_vectors
        self.delivered = delivered
        self.clock = clock
        self.metrics = metrics

    @property
    def sinks(self) -> list[str]:
        """The configured sinks, by name."""
        return [*self.datasets, *([WEBHOOK] if self.webhook is not None else [])]

    def push(self, sink: str, study: str, version: int, *, force: bool = False) -> Outcome:
        """Deliver ``version`` of ``study`` to ``sink`` unless it is there or superseded.
        A PushError from the sink propagates (the job retries or dead-letters it)."""
        if not force and self.studies.pushed_version(study, sink) >= version:
            return self._count(sink, Outcome.ALREADY)
        if self.studies.completed_version(study) > version:
            return self._count(sink, Outcome.SUPERSEDED)
        results = self.gather(study)
        if sink == WEBHOOK:
            assert self.webhook is not None, "no webhook sink configured"
            body = self.webhook_body(study, version, results)
            self.webhook.send(body, idempotency_key(study, version))
        else:
            self.datasets[sink].send(self.objects(sink, study, version, results))
        self.studies.pushed(study, sink, version)
        log.info("push.sent", sink=sink, study_instance_uid=study, version=version)
        others = [s for s in self.sinks if s != sink]  # this one has it: recorded just now
        if all(self.studies.pushed_version(study, s) >= version for s in others):
            self._time(study, version)
            self.delivered(study, version)
        return self._count(sink, Outcome.SENT)

    def _time(self, study: str, version: int) -> None:
        """Study completion latency: from the version's last arrival to its delivery to every
        sink (not observed once a newer version opened; two sinks' pushes finishing at the same
        moment on two workers may both observe it)."""
        if self.metrics is None:
            return
        try:
            times = self.studies.version_times(study, version)
        except redis.RedisError as exc:  # a metric never fails the push it measures
            log.debug("metrics.read_failed", error=type(exc).__name__)
            return
        if times is not None:
            self.metrics.study_completed(self.clock() - times[0])

    def dead_letter(self, letter_id: str, sink: str, study: str, version: int, reason: str) -> None:
        """Keep a push that waiting will not help, for an operator (``pacs-embed requeue``)."""
        self.dead_letters.add(
            letter_id or push_job_id(sink, study, version), sink, study, version, reason
        )
        self._count(sink, Outcome.DEAD_LETTERED)
        log.error(
            "push.dead_lettered",
            sink=sink,
            study_instance_uid=study,
            version=version,
            reason=reason,
        )

    def _count(self, sink: str, outcome: Outcome) -> Outcome:
        self.redis.hincrby(keys.PUSH_COUNTS, f"{sink}|{outcome}", 1)
        return outcome

    # -- what is pushed ------------------------------------------------------------------------

    def gather(self, study: str) -> Results:
        """Every image verdict of the study's instances (all versions), and the study verdict."""
        members = self.studies.members(study)
        frames = self.ledger.selected_frames(members)
        image_keys = [
            image_key(sop, frame)
            for sop, selected in zip(members, frames, strict=True)
            for frame in selected or ()
        ]
        verdicts = [v for v in self.store.verdicts(image_keys) if v is not None]
        whole = self.store.study_verdict(study) or study_verdict(study, [])
        return Results(whole, verdicts, members)

    def objects(
        self, sink: str, study: str, version: int, results: Results
    ) -> list[pydicom.Dataset]:
        """The SR, and the KOS when something is flagged, of one study version."""
        identity = ResultIdentity(study, version)
        sources = self._sources(results)
        now = datetime.fromtimestamp(self.clock(), UTC)
        before = self.studies.predecessor(study, sink, version)
        predecessor: Reference | None = ResultIdentity(study, before).sr if before else None
        report = build_report(
            sources,
            results.verdicts,
            results.study,
            identity=identity,
            algorithm=self.algorithm,
            predecessor=predecessor,
            now=now,
        )
        kos = build_kos(
            sources, results.verdicts, identity=identity, algorithm=self.algorithm, now=now
        )
        return [report, *([kos] if kos is not None else [])]

    def _sources(self, results: Results) -> list[pydicom.Dataset]:
        """The headers of the study's instances: from the spool, or — for an instance whose file
        retention deleted after an earlier version was delivered — a stand-in holding only what
        a reference needs (its UIDs, copied patient/study module), made from its record."""
        found = {sop: self.read_header(sop) for sop in results.members}
        present = {sop: ds for sop, ds in found.items() if ds is not None}
        if not present:  # retention deleted them all: nothing to copy the patient module from
            raise PermanentPushError("no source instance of the study is left in the spool")
        head = next(iter(present.values()))
        missing: dict[str, list[InstanceVerdict]] = {}
        for verdict in results.verdicts:
            if verdict.image.sop_instance_uid not in present:
                missing.setdefault(verdict.image.sop_instance_uid, []).append(verdict)
        for sop, verdicts in missing.items():
            present[sop] = _stand_in(head, verdicts)
        return list(present.values())

    def webhook_body(self, study: str, version: int, results: Results) -> bytes:
        """UIDs, verdicts, label checks, counts — never patient data (encode_body checks)."""
        identity = ResultIdentity(study, version)
        images = [verdict.to_json() for verdict in results.verdicts]
        if self.include_vectors:  # the study's vectors in chunks, not a round trip per image
            keys = [verdict.image.key for verdict in results.verdicts]
            vectors = {
                key: [round(float(x), 7) for x in row]
                for found, rows in self.store.vectors_in_chunks(keys)
                for key, row in zip(found, rows, strict=True)
            }
            for doc, key in zip(images, keys, strict=True):
                doc["vector"] = vectors.get(key)
        final = self.ledger.final(results.members)
        payload: dict[str, Any] = {
            "event": "study.results",
            "study_instance_uid": study,
            "version": version,
            "supersedes": version - 1 if version > 1 else None,
            "instances": {"received": len(results.members), "final": sum(final)},
            "study": results.study.to_json(),
            "images": images,
            "sr": {
                "series_instance_uid": identity.sr.series_instance_uid,
                "sop_instance_uid": identity.sr.sop_instance_uid,
            },
            "model": {"name": self.algorithm.model_name, "version": self.algorithm.model_version},
            "pacs_embed_version": self.algorithm.software_version,
        }
        return encode_body(payload, idempotency_key(study, version))


def idempotency_key(study: str, version: int) -> str:
    """The webhook's idempotency key of a study version: the same on every redo."""
    return f"pe-{digest(json.dumps([study, version]), 40)}"


def _stand_in(head: pydicom.Dataset, verdicts: Sequence[InstanceVerdict]) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for element in head:
        if element.tag.group in (0x0008, 0x0010, 0x0020) and element.keyword not in _OWN:
            ds.add(element)
    record = verdicts[0].image
    ds.SOPClassUID = record.sop_class_uid
    ds.SOPInstanceUID = record.sop_instance_uid
    ds.SeriesInstanceUID = record.series_instance_uid
    ds.StudyInstanceUID = record.study_instance_uid
    ds.Modality = record.modality
    frames = 1 + max(v.image.frame for v in verdicts)
    if frames > 1:
        ds.NumberOfFrames = frames  # at least: only the frames referenced matter here
    return ds


#: Instance- and series-level attributes a stand-in must not copy from another instance.
_OWN = frozenset(
    {
        "SOPClassUID",
        "SOPInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "InstanceNumber",
        "SeriesNumber",
        "NumberOfFrames",
        "ImageType",
        "SeriesDescription",
    }
)
