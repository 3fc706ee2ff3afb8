"""Verdicts through the embed service and the store: stored with the vectors, revised by a
bootstrap trim, aggregated per series and study, exported, never costing an embedding."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import redis
from structlog.testing import capture_logs

from pipeline.detect.detector import Detector, reference_store
from pipeline.detect.scoring import unit_rows
from pipeline.embed.contract import EMBEDDING_DIM
from pipeline.jobs import EmbedBatch, ImageItem
from pipeline.ledger import Ledger
from pipeline.records import ImageRecord
from pipeline.settings import DetectSettings
from pipeline.store import EmbeddingStore
from pipeline.verdicts import (
    BOOTSTRAP,
    SCORED,
    InstanceVerdict,
    binomial_tail,
    series_verdict,
    study_verdict,
)
from workers.service import EmbedService

DIM = EMBEDDING_DIM
SETTINGS = DetectSettings(alpha=0.05, min_reference=30, max_reference=500, k=5)


def vector_for(png: bytes) -> np.ndarray:
    """b'N<seed>' -> a normal of the cohort; b'X<axis>' -> a far point on that axis."""
    if png.startswith(b"X"):
        out = np.zeros(DIM)
        out[int(png[1:])] = 1.0
        return out
    rng = np.random.default_rng(int(png[1:]))
    centre = np.zeros(DIM)
    centre[0] = 1.0
    return centre + 0.5 * rng.standard_normal(DIM) / np.sqrt(DIM)


class Embedder:
    def embed_images(self, pngs: list[bytes]) -> np.ndarray:
        return unit_rows(np.stack([vector_for(p) for p in pngs]))


def image(n: int, png: bytes, series: str = "1.2.3", study: str = "1.2") -> ImageItem:
    record = ImageRecord(
        sop_instance_uid=f"1.2.3.{n}",
        study_instance_uid=study,
        series_instance_uid=series,
        modality="CT",
        body_part="Chest",
    )
    return ImageItem(record, png)


def make(conn: redis.Redis, settings: DetectSettings = SETTINGS) -> tuple[EmbedService, Detector]:
    detector = Detector(settings, reference_store(settings, conn))
    ledger = Ledger(conn)
    return EmbedService(Embedder(), EmbeddingStore(conn, ledger), ledger, detector), detector


def test_off_cohort_image_is_flagged_with_its_evidence(redis_conn: redis.Redis) -> None:
    """With a reference imported, the planted far image gets p = 1/(n+1) and a full record."""
    service, detector = make(redis_conn)
    reference = Embedder().embed_images([f"N{1000 + i}".encode() for i in range(60)])
    version = detector.references.replace("CT/CHEST", reference).version
    batch = [image(i, f"N{i}".encode()) for i in range(8)] + [image(99, b"X7")]
    service.run(EmbedBatch("1.2.3", tuple(batch)))
    stored = service.store.verdicts(["1.2.3.99", "1.2.3.0"])
    odd, normal = stored
    assert odd is not None and normal is not None
    assert odd.outlier and odd.p_value == pytest.approx(1 / 61)
    assert (odd.cohort, odd.state, odd.alpha, odd.k) == ("CT/CHEST", SCORED, 0.05, 5)
    assert (odd.reference_size, odd.reference_version) == (60, version)
    assert odd.score > 0.9 and normal.score < 0.5
    assert normal.p_value > 1 / 61


def test_bootstrap_has_no_flags_until_min_reference_then_trims(redis_conn: redis.Redis) -> None:
    """Bootstrap verdicts carry no p-value; the trim at min_reference revises the outlier's."""
    service, detector = make(redis_conn)
    first = [image(i, f"N{i}".encode()) for i in range(15)] + [image(50, b"X3")]
    service.run(EmbedBatch("1.2.3", tuple(first)))
    early = service.store.verdicts(["1.2.3.50"])[0]
    assert early is not None and early.state == BOOTSTRAP and not early.outlier
    assert math.isnan(early.p_value)
    service.run(EmbedBatch("1.2.3", tuple(image(i, f"N{i}".encode()) for i in range(15, 31))))
    revised = service.store.verdicts(["1.2.3.50"])[0]
    assert revised is not None and revised.outlier and revised.reason == "reference_trim"
    assert revised.p_value == pytest.approx(1 / 32)
    snap = detector.references.snapshot("CT/CHEST")
    assert snap.state == SCORED and snap.size == 31 and "1.2.3.50" not in snap.uid_set


def test_series_embedding_is_the_normalised_mean_counted_once(redis_conn: redis.Redis) -> None:
    """Series vector = normalised mean of its images; a redone or resent batch adds nothing."""
    service, _ = make(redis_conn)
    items = [image(i, f"N{i}".encode()) for i in range(5)]
    service.run(EmbedBatch("1.2.3", tuple(items[:3])))
    service.run(EmbedBatch("1.2.3", tuple(items)))
    service.store.save(  # a duplicate save (e.g. two workers on one batch) must not double-count
        [items[0].image], Embedder().embed_images([items[0].png])
    )
    vectors = Embedder().embed_images([item.png for item in items])
    mean = vectors.mean(axis=0)
    series = service.store.series_vector("1.2.3")
    assert series is not None
    np.testing.assert_allclose(series, mean / np.linalg.norm(mean), atol=1e-6)


def test_study_verdict_aggregates_its_series(redis_conn: redis.Redis) -> None:
    """A one-image series whose image is flagged flags the series and therefore the study."""
    service, detector = make(redis_conn)
    detector.references.replace(
        "CT/CHEST", Embedder().embed_images([f"N{1000 + i}".encode() for i in range(60)])
    )
    normal = tuple(image(i, f"N{i}".encode(), "1.2.3.7") for i in range(4))
    service.run(EmbedBatch("1.2.3.7", normal))
    service.run(EmbedBatch("1.2.3.8", (image(40, b"X9", "1.2.3.8"),)))
    study = service.store.study_verdict("1.2")
    assert study is not None and study.outlier and study.images == 5
    assert [(s.uid, s.outlier) for s in study.series] == [("1.2.3.7", False), ("1.2.3.8", True)]
    odd = service.store.verdicts(["1.2.3.40"])[0]
    assert odd is not None and study.min_p_value == pytest.approx(1 / (odd.reference_size + 1))
    assert study.to_json()["series"][1]["outlier_instances"] == 1


def verdict(n: int, outlier: bool, p: float = 0.5) -> InstanceVerdict:
    record = ImageRecord(
        sop_instance_uid=f"1.{n}", study_instance_uid="1", series_instance_uid="1.9"
    )
    return InstanceVerdict(record, "CT/CHEST", SCORED, 0.1, p, 0.01, 10, 100, 1, outlier)


def test_series_rule_is_a_binomial_test() -> None:
    """One flag in a 1-image series flags it; in a 20-image series it takes 3 at alpha 0.01."""
    assert series_verdict("s", [verdict(0, True, 0.005)]).outlier
    twenty = [verdict(i, i < 2, 0.005 if i < 2 else 0.5) for i in range(20)]
    assert not series_verdict("s", twenty).outlier
    twenty[2] = verdict(2, True, 0.005)
    assert series_verdict("s", twenty).outlier
    assert binomial_tail(20, 3, 0.01) <= 0.01 < binomial_tail(20, 2, 0.01)


def test_study_rule_is_any_series() -> None:
    """A study is flagged when any of its series is; counts are sums."""
    a = series_verdict("a", [verdict(0, False)])
    b = series_verdict("b", [verdict(1, True, 0.001)])
    study = study_verdict("st", [a, b])
    assert study.outlier and study.images == 2 and study.outlier_instances == 1
    assert not study_verdict("st", [a]).outlier


def test_export_has_verdict_columns(redis_conn: redis.Redis, tmp_path: Path) -> None:
    """Export rows carry cohort, outlier, p_value (NaN while bootstrapping), label_mismatch."""
    service, detector = make(redis_conn)
    service.run(EmbedBatch("1.2.3", (image(1, b"N1"),)))  # bootstrap: NaN
    detector.references.replace(
        "CT/CHEST", Embedder().embed_images([f"N{1000 + i}".encode() for i in range(60)])
    )
    service.run(EmbedBatch("1.2.3", (image(2, b"N2"), image(3, b"X5"))))
    assert service.store.export(tmp_path / "e.npz") == 3
    with np.load(tmp_path / "e.npz") as data:
        assert list(data["sop_instance_uids"]) == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
        assert list(data["cohort"]) == ["CT/CHEST"] * 3
        assert list(data["outlier"]) == [False, False, True]
        assert math.isnan(data["p_value"][0]) and data["p_value"][2] == pytest.approx(1 / 61)
        assert data["label_mismatch"].dtype == bool and not data["label_mismatch"].any()
        assert list(data["series_keys"]) == ["1.2.3"] and data["series_vectors"].shape == (1, DIM)


def test_a_detection_failure_never_costs_an_embedding(redis_conn: redis.Redis) -> None:
    """If the detector breaks, vectors are stored without verdicts and the failure is logged."""
    service, detector = make(redis_conn)

    def broken(*_args: object) -> list[InstanceVerdict]:
        raise RuntimeError("bug")

    detector.assess = broken  # type: ignore[method-assign]
    with capture_logs() as logs:
        outcome = service.run(EmbedBatch("1.2.3", (image(1, b"N1"),)))
    assert outcome.embedded == 1 and service.store.get("1.2.3.1") is not None
    assert service.store.verdicts(["1.2.3.1"]) == [None]
    assert any(e["event"] == "detect.failed" and e["step"] == "assess" for e in logs)
