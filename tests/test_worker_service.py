"""Embed jobs against a real Redis: storage, idempotency, quarantine, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from pipeline.errors import EndpointAuthError, PermanentEndpointError, TransientEndpointError
from pipeline.jobs import EmbedBatch, ImageItem, split
from pipeline.ledger import Ledger
from pipeline.records import ImageRecord
from pipeline.store import EmbeddingStore
from workers.service import EmbedService


class StubEmbedder:
    """Vector = one-hot-ish from the PNG bytes; PNGs starting with b'BAD' are refused (400)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def embed_images(self, pngs: list[bytes]) -> np.ndarray:
        self.calls.append(len(pngs))
        if any(png.startswith(b"BAD") for png in pngs):
            raise PermanentEndpointError("400: image cannot be decoded", status=400)
        out = np.zeros((len(pngs), 1024), np.float32)
        for i, png in enumerate(pngs):
            out[i, sum(png) % 1024] = 1.0
        return out


def item(n: int, png: bytes | None = None) -> ImageItem:
    record = ImageRecord(
        sop_instance_uid=f"1.2.3.{n}",
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        modality="CT",
        body_part="CHEST",
    )
    return ImageItem(record, png or bytes([n]) * 10)


@pytest.fixture
def parts(redis_conn: redis.Redis) -> tuple[EmbedService, StubEmbedder, Ledger, EmbeddingStore]:
    ledger = Ledger(redis_conn)
    store = EmbeddingStore(redis_conn, ledger)
    stub = StubEmbedder()
    return EmbedService(stub, store, ledger), stub, ledger, store


def test_batch_is_stored_and_marked(parts) -> None:  # type: ignore[no-untyped-def]
    """Every image of a batch gets its vector stored and its instance marked embedded."""
    service, _, ledger, store = parts
    outcome = service.run(EmbedBatch("1.2.3", tuple(item(n) for n in range(1, 5))))
    assert outcome.embedded == 4
    assert ledger.counts()["embedded"] == 4
    vector = store.get("1.2.3.2")
    assert vector is not None and vector.shape == (1024,)


def test_redone_batch_is_not_embedded_twice(parts) -> None:  # type: ignore[no-untyped-def]
    """A batch run again after a crash calls the endpoint only for what is missing."""
    service, stub, _, store = parts
    service.run(EmbedBatch("1.2.3", (item(1), item(2))))
    outcome = service.run(EmbedBatch("1.2.3", (item(1), item(2), item(3))))
    assert stub.calls == [2, 1]
    assert (outcome.embedded, outcome.already) == (1, 2)
    assert store.count() == 3


def test_one_bad_image_is_isolated(parts) -> None:  # type: ignore[no-untyped-def]
    """A permanent error for a batch is narrowed to the image that causes it."""
    service, _, ledger, _ = parts
    outcome = service.run(EmbedBatch("1.2.3", (item(1), item(2, b"BADPNG"), item(3))))
    assert (outcome.embedded, outcome.failed) == (2, 1)
    failures = ledger.failures()
    assert [f.sop_instance_uid for f in failures] == ["1.2.3.2"]
    assert "image cannot be decoded" in failures[0].reason


def test_export_npz(parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Export writes sorted UIDs and an N x 1024 float32 matrix of unit vectors."""
    service, _, _, store = parts
    service.run(EmbedBatch("1.2.3", tuple(item(n) for n in (3, 1, 2))))
    assert store.export(tmp_path / "e.npz") == 3
    data = np.load(tmp_path / "e.npz")
    assert list(data["sop_instance_uids"]) == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert data["vectors"].shape == (3, 1024) and data["vectors"].dtype == np.float32
    assert list(data["series_instance_uids"]) == ["1.2.3"] * 3


def test_split_caps_count_and_bytes() -> None:
    """Batches respect both caps and keep order; an oversized image travels alone."""
    items = [item(n, bytes(100)) for n in range(1, 8)]
    assert [len(b) for b in split(items, 3, 10_000)] == [3, 3, 1]
    assert [len(b) for b in split(items, 16, 250)] == [2, 2, 2, 1]
    big = [item(1, bytes(1000)), item(2, bytes(10))]
    assert [len(b) for b in split(big, 16, 500)] == [1, 1]
    assert [i.image.key for b in split(items, 3, 10_000) for i in b] == [i.image.key for i in items]


class RefusingEmbedder(StubEmbedder):
    def embed_images(self, pngs: list[bytes]) -> np.ndarray:
        raise EndpointAuthError("endpoint answered 401 Unauthorized", status=401)


def test_wrong_key_retries_instead_of_quarantining(redis_conn: redis.Redis) -> None:
    """A 401 is raised as transient (rq retries the job); no image is marked failed."""
    ledger = Ledger(redis_conn)
    service = EmbedService(RefusingEmbedder(), EmbeddingStore(redis_conn, ledger), ledger)
    with pytest.raises(TransientEndpointError, match="401"):
        service.run(EmbedBatch("1.2.3", (item(1), item(2))))
    assert ledger.counts()["failed"] == 0
