"""Similarity search over the embeddings store: the function, the CLI and the admin route."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from pacs_embed import cli
from pacs_embed.compose import Root
from pipeline.admin.server import AdminServer
from pipeline.detect.search import nearest
from pipeline.ledger import Ledger
from pipeline.records import ImageRecord
from pipeline.settings import Settings
from pipeline.store import EmbeddingStore
from pipeline.verdicts import SCORED, InstanceVerdict
from tests.admin_http import get as admin_get
from tests.conftest import free_port


def unit(*values: float) -> np.ndarray:
    v = np.zeros(1024, np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


BEARER = "t0ken"  # the admin bearer token of these tests

VECTORS = {
    "1.2.1": unit(1, 0),
    "1.2.2": unit(1, 0.1),
    "1.2.3": unit(1, 0.5),
    "1.2.4": unit(0, 1),
    "1.2.5": unit(-1, 0),
}


@pytest.fixture
def store(redis_conn: redis.Redis) -> EmbeddingStore:
    """Five stored images; 1.2.4 is in cohort MR/HEAD, the rest in CR/CHEST."""
    s = EmbeddingStore(redis_conn, Ledger(redis_conn))
    images, verdicts = [], []
    for uid in VECTORS:
        image = record(uid)
        images.append(image)
        cohort = "MR/HEAD" if uid == "1.2.4" else "CR/CHEST"
        verdicts.append(InstanceVerdict(image, cohort, SCORED, 0.1, 0.5, 0.01, 10, 100, 1, False))
    s.save(images, np.stack(list(VECTORS.values())), verdicts)
    return s


def record(uid: str, frame: int = 0) -> ImageRecord:
    return ImageRecord(
        sop_instance_uid=uid,
        frame=frame,
        study_instance_uid="1.4",
        series_instance_uid="1.3",
        modality="CR",
        body_part="CHEST",
    )


def test_nearest_orders_by_cosine_and_skips_the_query(store: EmbeddingStore) -> None:
    """Hits come most similar first, with their similarity; the query's own UID is left out."""
    hits = nearest(store, VECTORS["1.2.1"], top=3, exclude="1.2.1")
    assert [h.image.key for h in hits] == ["1.2.2", "1.2.3", "1.2.4"]
    assert hits[0].similarity == pytest.approx(float(VECTORS["1.2.1"] @ VECTORS["1.2.2"]))
    assert hits[0].image == record("1.2.2") and hits[0].cohort == "CR/CHEST"


def test_nearest_within_a_cohort(store: EmbeddingStore) -> None:
    """--cohort searches only that cohort's images."""
    hits = nearest(store, VECTORS["1.2.1"], top=10, cohort="MR/HEAD")
    assert [h.image.key for h in hits] == ["1.2.4"]


def test_nearest_keeps_the_best_across_chunks(store: EmbeddingStore) -> None:
    """The running top-N is right when the store is read in many small chunks."""
    original = store.vectors_in_chunks
    store.vectors_in_chunks = lambda keys=None, chunk=1000: original(keys, chunk=2)  # type: ignore[method-assign]
    hits = nearest(store, VECTORS["1.2.5"], top=2)
    assert [h.image.key for h in hits] == ["1.2.5", "1.2.4"]


def test_top_is_bounded(store: EmbeddingStore) -> None:
    """A request for 0 or a million hits is refused."""
    with pytest.raises(ValueError, match="top"):
        nearest(store, VECTORS["1.2.1"], top=0)


def test_cli_search_by_sop_prints_json(
    store: EmbeddingStore,
    redis_server: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`pacs-embed search --sop UID --json` prints the hits; an unknown UID exits 1."""
    monkeypatch.setenv("PACS_EMBED_REDIS__URL", redis_server)
    monkeypatch.setattr(cli.logs, "configure", lambda *_args: None)  # global, not under test
    assert cli.main(["search", "--sop", "1.2.1", "--top", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [h["sop_instance_uid"] for h in doc["hits"]] == ["1.2.2", "1.2.3"]
    assert cli.main(["search", "--sop", "9.9.9"]) == 1


@pytest.fixture
def admin(store: EmbeddingStore, redis_conn: redis.Redis) -> Iterator[AdminServer]:
    settings = Settings.load(admin={"host": "127.0.0.1", "port": free_port(), "token": BEARER})
    server = Root(settings, redis_conn).admin
    server.start_in_thread()
    yield server
    server.shutdown()


def get(server: AdminServer, path: str, bearer: str | None = BEARER) -> tuple[int, Any]:
    return admin_get(server, path, bearer)


def test_admin_search_route(admin: AdminServer) -> None:
    """/search?sop= answers with hits behind the bearer token; bad or unknown UIDs are 4xx."""
    code, doc = get(admin, "/search?sop=1.2.1&top=1")
    assert code == 200 and doc["hits"] == [
        {
            **record("1.2.2").to_dict(),
            "cohort": "CR/CHEST",
            "similarity": pytest.approx(float(VECTORS["1.2.1"] @ VECTORS["1.2.2"]), abs=1e-5),
        }
    ]
    assert get(admin, "/search?sop=1.2.1", bearer=None)[0] == 401
    assert get(admin, "/search?sop=not-a-uid")[0] == 400
    assert get(admin, "/search?sop=9.9.9")[0] == 404
    assert get(admin, "/search?sop=1.2.1&top=0")[0] == 400


def test_admin_verdicts_route(admin: AdminServer) -> None:
    """/verdicts?study= returns the study verdict with its series."""
    code, doc = get(admin, "/verdicts?study=1.4")
    assert code == 200 and doc["images"] == 5 and doc["outlier"] is False
    assert get(admin, "/verdicts?study=9.9")[0] == 404
    assert get(admin, "/verdicts")[0] == 400
