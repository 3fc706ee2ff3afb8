"""One record per image, (SOP Instance UID, frame), from conversion to the store (issue 9).

Every selected frame of a multi-frame object is embedded exactly once, stored, searched and
exported under its own identity, whichever batches carry its frames; the instance is embedded
once all of them are. The view is read from the header (ViewPosition, else the View Code
Sequence), reduced to a term, and splits cohorts when ``detect.cohort_fields`` names it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import redis
from rq import Queue, SimpleWorker

from dicom_listener.dispatcher import DispatchLimits
from pipeline.convert import ConvertOptions, convert_file
from pipeline.convert.fields import view_of
from pipeline.detect.detector import Detector, reference_store
from pipeline.detect.search import nearest
from pipeline.embed.contract import EMBEDDING_DIM
from pipeline.errors import PermanentEndpointError
from pipeline.jobs import EMBED_QUEUE, EmbedBatch, ImageItem, enqueue_batch
from pipeline.ledger import Ledger, Stage, State
from pipeline.records import ImageRecord, image_key, parse_image_key
from pipeline.settings import DetectSettings
from pipeline.store import EmbeddingStore
from pipeline.vocabulary import UNKNOWN, view_term
from tests import factory
from tests.test_dispatcher import run_dispatcher
from workers import runtime
from workers.service import EmbedService

SOP = "1.2.3.1"  # the spool UID run_dispatcher gives the first file
FRAMES = 5


class Embedder:
    """A unit vector seeded by the PNG's bytes (different pictures, different vectors);
    PNGs starting with b"BAD" are refused as the endpoint refuses an unreadable image."""

    def __init__(self) -> None:
        self.images = 0

    def embed_images(self, pngs: list[bytes]) -> np.ndarray:
        if any(png.startswith(b"BAD") for png in pngs):
            raise PermanentEndpointError("400: image cannot be decoded", status=400)
        self.images += len(pngs)
        seeds = [int.from_bytes(hashlib.sha256(png).digest()[:8]) for png in pngs]
        out = np.stack([np.random.default_rng(s).standard_normal(EMBEDDING_DIM) for s in seeds])
        unit: np.ndarray = (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)
        return unit


def multiframe(frames: int = FRAMES) -> bytes:
    """An OT multi-frame whose frames differ (a bright square moving along the diagonal)."""
    pixels = np.zeros((frames, 32, 32), np.uint8)
    pixels[:] = np.arange(32, dtype=np.uint8)[None, None, :] * 4
    for f in range(frames):
        pixels[f, 5 * f : 5 * f + 6, 5 * f : 5 * f + 6] = 255
    ds = factory.gray_image(pixels, modality="OT")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(SOP)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def record(sop: str, frame: int = 0, series: str = "1.2.3", **fields: str) -> ImageRecord:
    return ImageRecord(
        sop_instance_uid=sop,
        frame=frame,
        study_instance_uid="1.2",
        series_instance_uid=series,
        **{"modality": "OT", "body_part": "CHEST", **fields},
    )


# -- the record and its key --------------------------------------------------------------------
def test_image_key_names_frame_zero_by_its_sop_uid_alone() -> None:
    """Single-frame objects keep the names already stored; other frames read back exactly."""
    assert image_key("1.2.3") == "1.2.3" and parse_image_key("1.2.3") == ("1.2.3", 0)
    assert image_key("1.2.3", 4) == "1.2.3/4" and parse_image_key("1.2.3/4") == ("1.2.3", 4)
    assert parse_image_key("x1.2#7") == ("x1.2#7", 0)  # a non-conformant but safe UID


def test_payload_items_from_other_versions_are_read() -> None:
    """An item written before records had a view (or a frame) reads with the defaults; a field
    a newer listener adds is ignored."""
    old = {
        "sop_instance_uid": "1.2.3.4",
        "series_instance_uid": "1.2.3",
        "study_instance_uid": "1.2",
        "modality": "CT",
        "body_part": "CHEST",
        "png": b"PNG",
    }
    [item] = EmbedBatch.from_payload({"series_instance_uid": "1.2.3", "items": [old]}).items
    assert (item.image.frame, item.image.view, item.png) == (0, UNKNOWN, b"PNG")
    newer = {**old, "frame": 3, "view": "PA", "laterality": "L"}
    [item] = EmbedBatch.from_payload({"series_instance_uid": "1.2.3", "items": [newer]}).items
    assert (item.image.key, item.image.view) == ("1.2.3.4/3", "PA")
    batch = EmbedBatch("1.2.3", (item,))
    assert EmbedBatch.from_payload(batch.to_payload()) == batch


# -- every frame, exactly once -----------------------------------------------------------------
def drain(connection: redis.Redis, service: EmbedService) -> None:
    """Run the embed queue dry in this process, as `pacs-embed worker --burst` does."""
    runtime.bind(service)
    worker = SimpleWorker([Queue(EMBED_QUEUE, connection=connection)], connection=connection)
    worker.work(burst=True, logging_level="WARNING")


def test_every_frame_of_a_multiframe_object_is_stored_and_exported(
    tmp_path: Path, redis_conn: redis.Redis
) -> None:
    """frame_policy "all", batches of 2: the 5 frames travel in 3 jobs through a real queue and
    a worker; all 5 are stored and exported (frames 0..4); the instance is embedded once."""
    ledger = Ledger(redis_conn)
    queue = Queue(EMBED_QUEUE, connection=redis_conn)
    batches = run_dispatcher(
        tmp_path,
        ledger,
        [multiframe()],
        enqueue=lambda batch: enqueue_batch(queue, batch, timeout=60, retries=0),
        options=ConvertOptions(size=64, frame_policy="all"),
        limits=DispatchLimits(batch_size=2, linger_seconds=0.1, in_flight=1),
    )
    assert [len(b.items) for b in batches] == [2, 2, 1]
    assert queue.count == 3  # a job per batch: frames of one instance are not one job
    store = EmbeddingStore(redis_conn, ledger)
    embedder = Embedder()
    drain(redis_conn, EmbedService(embedder, store, ledger))
    assert embedder.images == FRAMES and store.count() == FRAMES
    assert store.export(tmp_path / "e.npz") == FRAMES
    data = np.load(tmp_path / "e.npz")
    assert list(data["sop_instance_uids"]) == [SOP] * FRAMES
    assert list(data["frame"]) == list(range(FRAMES)) and data["frame"].dtype.kind == "i"
    assert len({row.tobytes() for row in data["vectors"]}) == FRAMES  # five different pictures
    assert ledger.counts()[State.EMBEDDED] == 1 and ledger.counters()["embedded"] == 1
    assert ledger.failures() == []


def items(sop: str, frames: list[int], png: bytes | None = None) -> tuple[ImageItem, ...]:
    return tuple(ImageItem(record(sop, f), png or f"{sop}/{f}".encode()) for f in frames)


def test_frames_spanning_batches_complete_their_instance_in_any_order(
    redis_conn: redis.Redis,
) -> None:
    """The instance stays queued until its last selected frame is stored, whatever the order;
    a redone batch costs nothing; verdicts and series sums count each (sop, frame) once."""
    settings = DetectSettings(alpha=0.05, min_reference=30, max_reference=500, k=5)
    ledger = Ledger(redis_conn)
    store = EmbeddingStore(redis_conn, ledger)
    embedder = Embedder()
    detector = Detector(settings, reference_store(settings, redis_conn))
    service = EmbedService(embedder, store, ledger, detector)
    ledger.spooled([SOP])
    ledger.converted(SOP, record(SOP).instance_fields(), frames=range(FRAMES))
    for frames in ([2, 3], [4]):
        service.run(EmbedBatch("1.2.3", items(SOP, frames)))
        assert ledger.counts()[State.QUEUED] == 1 and ledger.counts()[State.EMBEDDED] == 0
    outcome = service.run(EmbedBatch("1.2.3", items(SOP, [0, 1])))
    assert outcome.embedded == 2 and ledger.counts()[State.EMBEDDED] == 1
    again = service.run(EmbedBatch("1.2.3", items(SOP, [0, 1])))
    assert (again.embedded, again.already, embedder.images) == (0, 2, FRAMES)
    assert ledger.counters()["embedded"] == 1
    keys = [image_key(SOP, f) for f in range(FRAMES)]
    verdicts = store.verdicts(keys)
    assert [v.image.key if v else None for v in verdicts] == keys
    series = store.series_verdict("1.2.3")
    assert series is not None and series.images == FRAMES
    assert int(redis_conn.hget("pe:series:1.2.3", "count") or 0) == FRAMES


def test_a_frame_that_fails_fails_its_instance_and_a_resend_completes_it(
    redis_conn: redis.Redis,
) -> None:
    """Frame 1 refused: the instance is failed, never embedded by its other frames; the resend
    embeds only frame 1, and a batch whose frames were all stored still completes the instance."""
    ledger = Ledger(redis_conn)
    store = EmbeddingStore(redis_conn, ledger)
    embedder = Embedder()
    service = EmbedService(embedder, store, ledger)
    ledger.converted(SOP, record(SOP).instance_fields(), frames=[0, 1, 2])
    bad = (*items(SOP, [0]), ImageItem(record(SOP, 1), b"BAD"))
    assert service.run(EmbedBatch("1.2.3", bad)).failed == 1
    service.run(EmbedBatch("1.2.3", items(SOP, [2])))
    assert [f.sop_instance_uid for f in ledger.failures()] == [SOP]
    assert ledger.counts()[State.EMBEDDED] == 0 and store.count() == 2
    ledger.spooled([SOP])  # the resend
    ledger.converted(SOP, record(SOP).instance_fields(), frames=[0, 1, 2])
    service.run(EmbedBatch("1.2.3", items(SOP, [1])))
    assert ledger.counts()[State.EMBEDDED] == 1 and embedder.images == 3
    ledger.failed(SOP, Stage.EMBED, "e.g. a give-up racing a duplicate job of the same batch")
    outcome = service.run(EmbedBatch("1.2.3", items(SOP, [0, 1, 2])))
    assert outcome.already == 3 and ledger.counts()[State.EMBEDDED] == 1


def test_search_names_the_frame_and_leaves_out_the_query_instance(
    redis_conn: redis.Redis,
) -> None:
    """Hits are images: (sop, frame); ``exclude`` drops every frame of the query's instance;
    ``get`` without a frame finds an instance whose only frame is not 0."""
    ledger = Ledger(redis_conn)
    store = EmbeddingStore(redis_conn, ledger)
    vectors = np.eye(4, EMBEDDING_DIM, dtype=np.float32)
    vectors[1, 0] = vectors[2, 0] = vectors[3, 0] = 0.5
    images = [record("1.2.3.1", 0), record("1.2.3.1", 1), record("1.2.3.2", 0)]
    images.append(record("1.2.3.3", 7))
    store.save(images, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    hits = nearest(store, vectors[0], top=10)
    assert hits[0].image == images[0] and hits[0].to_json()["frame"] == 0
    assert {h.image.key for h in hits} == {"1.2.3.1", "1.2.3.1/1", "1.2.3.2", "1.2.3.3/7"}
    hits = nearest(store, vectors[0], top=10, exclude="1.2.3.1")
    assert {h.image.key for h in hits} == {"1.2.3.2", "1.2.3.3/7"}
    ledger.converted("1.2.3.3", images[3].instance_fields(), frames=[7])
    found = store.get("1.2.3.3")
    assert found is not None and store.get("1.2.3.3", 0) is None
    assert list(store.records(["1.2.3.3/7"])) == [images[3]]


# -- the view ----------------------------------------------------------------------------------
def _with(ds: pydicom.Dataset, **elements: object) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in elements.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return ds


def _code(meaning: str | None, value: str = "") -> pydicom.Dataset:
    item = pydicom.Dataset()
    if value:
        item.CodeValue, item.CodingSchemeDesignator = value, "SCT"
    if meaning is not None:
        item.CodeMeaning = meaning
    return item


@pytest.mark.parametrize(
    ("elements", "view"),
    [
        ({"ViewPosition": "PA"}, "PA"),
        ({"ViewPosition": "LL"}, "LAT"),
        ({"ViewPosition": "DOE^JANE"}, UNKNOWN),  # never the raw text
        ({"ViewPosition": None}, UNKNOWN),
        ({"ViewPosition": "", "ViewCodeSequence": [_code("postero-anterior")]}, "PA"),
        ({"ViewPosition": None, "ViewCodeSequence": [_code("", "399348003")]}, "AP"),
        ({"ViewPosition": None, "ViewCodeSequence": [_code("left lateral", "399173006")]}, "LAT"),
        ({"ViewPosition": None, "ViewCodeSequence": [_code("DOE^JANE", "123")]}, UNKNOWN),
    ],
)
def test_view_is_read_from_view_position_else_the_view_code_sequence(
    elements: dict[str, object], view: str
) -> None:
    assert view_of(_with(factory.mono1_cr(rows=8, columns=8), **elements)) == view


def test_view_terms() -> None:
    """Spellings of one projection are one term; unknown text, odd types and overlong values
    are UNKNOWN."""
    assert [view_term(v) for v in ("pa", "Lateral", "R-10206", "MLO", "cranio-caudal")] == [
        "PA",
        "LAT",
        "AP",
        "MLO",
        "CC",
    ]
    assert {view_term(v) for v in ("", None, 3, "CHEST", "A" * 65, "PA\\LAT")} == {UNKNOWN}


def test_view_splits_cohorts_when_it_is_a_cohort_field(
    tmp_path: Path, redis_conn: redis.Redis
) -> None:
    """Two radiographs differing only by ViewPosition (PA, LAT) are in different cohorts with
    cohort_fields modality/body_part/view, and in the same one by default."""
    paths = []
    for position in ("PA", "LAT"):
        ds = _with(factory.mono1_cr(rows=32, columns=32), ViewPosition=position)
        paths.append(factory.write(ds, tmp_path / f"{position}.dcm"))
    converted = [convert_file(path, ConvertOptions(size=64)) for path in paths]
    images = [c.images[0] for c in converted]
    assert [image.view for image in images] == ["PA", "LAT"]
    settings = DetectSettings(cohort_fields=["modality", "body_part", "view"])
    detector = Detector(settings, reference_store(settings, redis_conn))
    ledger = Ledger(redis_conn)
    store = EmbeddingStore(redis_conn, ledger)
    service = EmbedService(Embedder(), store, ledger, detector)
    for image, c in zip(images, converted, strict=True):
        service.run(EmbedBatch(image.series_instance_uid, (ImageItem(image, c.pngs[0]),)))
    verdicts = store.verdicts([image.key for image in images])
    assert [v.cohort if v else None for v in verdicts] == ["CR/CHEST/PA", "CR/CHEST/LAT"]
    assert store.cohort_members("CR/CHEST/LAT") == [images[1].key]
    default = Detector(DetectSettings(), reference_store(DetectSettings(), redis_conn))
    assert {default.cohort_of(image) for image in images} == {"CR/CHEST"}
