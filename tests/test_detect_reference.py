"""Reference sets in a real Redis: persistence, bootstrap and trim, growth cap, concurrency."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import redis

from pipeline.detect.admission import Policy, checkpoint
from pipeline.detect.reference import ReferenceStore
from pipeline.detect.scoring import neighbour_table, scores_from_table, unit_rows
from pipeline.keys import reference_keys
from pipeline.verdicts import BOOTSTRAP, SCORED

DIM = 32
K = 4


def normals(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = np.zeros(DIM)
    centre[0] = 1.0
    return unit_rows(centre + 0.5 * rng.standard_normal((n, DIM)) / np.sqrt(DIM))


def far(n: int = 1) -> np.ndarray:
    out = np.zeros((n, DIM), np.float32)
    out[:, 1] = 1.0
    return out


def store(conn: redis.Redis, min_reference: int = 20, max_reference: int = 200) -> ReferenceStore:
    return ReferenceStore(
        conn, k=K, min_reference=min_reference, max_reference=max_reference, trim_mads=10.0, dim=DIM
    )


def uids(prefix: str, n: int) -> list[str]:
    return [f"1.2.{prefix}.{i}" for i in range(n)]


def test_reference_survives_a_restart(redis_server: str) -> None:
    """A new store object on a new connection sees the same vectors, version and LOO scores."""
    first_conn = redis.Redis.from_url(redis_server)
    first_conn.flushdb()
    first = store(first_conn)
    first.replace("CR/CHEST", normals(1, 50), uids("1", 50))
    first.admit("CR/CHEST", normals(2, 5), uids("2", 5))
    before = first.snapshot("CR/CHEST")
    first_conn.close()

    again = store(redis.Redis.from_url(redis_server)).snapshot("CR/CHEST")
    assert (again.size, again.version, again.state) == (55, before.version, SCORED)
    np.testing.assert_array_equal(again.vectors, before.vectors)
    np.testing.assert_allclose(again.loo_sorted, before.loo_sorted)
    assert again.uids == before.uids
    assert store(redis.Redis.from_url(redis_server)).cohorts() == ["CR/CHEST"]


def test_bootstrap_trims_outliers_then_scores(redis_conn: redis.Redis) -> None:
    """The first images all join; at min_reference the gross outliers are trimmed and reported."""
    refs = store(redis_conn, min_reference=20)
    batch = np.concatenate([normals(3, 10), far(1)])
    first = refs.admit("CT/HEAD", batch, uids("a", 11))
    assert (first.admitted, first.snapshot.state, first.trimmed) == (11, BOOTSTRAP, ())
    second = refs.admit("CT/HEAD", normals(4, 10), uids("b", 10))
    assert second.snapshot.state == SCORED
    assert [t.uid for t in second.trimmed] == ["1.2.a.10"]
    assert second.trimmed[0].p_value == pytest.approx(1 / 21)
    assert second.snapshot.size == 20
    assert "1.2.a.10" not in second.snapshot.uid_set


def test_reference_rechecks_itself_when_it_doubles(redis_conn: redis.Redis) -> None:
    """An outlier that got in (here: imported) is trimmed when the reference reaches 2x min."""
    refs = store(redis_conn, min_reference=20)
    refs.replace("CR/CHEST", np.concatenate([normals(20, 37), far(1)]), uids("h", 38))
    assert refs.admit("CR/CHEST", normals(21, 1), uids("i", 1)).trimmed == ()  # 39: no check
    crossing = refs.admit("CR/CHEST", normals(22, 1), uids("j", 1))  # 40 = 2 x 20: check
    assert [t.uid for t in crossing.trimmed] == ["1.2.h.37"]
    assert crossing.trimmed[0].p_value == pytest.approx(1 / 40)
    assert crossing.snapshot.size == 39 and crossing.snapshot.state == SCORED


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (90, 99, False),
        (95, 100, True),  # min_reference: the bootstrap trim
        (100, 116, False),
        (190, 206, True),  # 2 x min
        (206, 222, False),
        (390, 406, True),  # 4 x min
        (1590, 1606, True),  # 16 x min
        (1606, 1990, False),
        (1990, 2000, True),  # max_reference
    ],
)
def test_checkpoints_are_min_doublings_and_cap(before: int, after: int, expected: bool) -> None:
    """Re-checks happen at min_reference, at each doubling, and on reaching max_reference."""
    assert checkpoint(before, after, Policy(10, 100, 2000, 10.0)) is expected


def test_scored_reference_admits_within_limit_until_full(redis_conn: redis.Redis) -> None:
    """After bootstrap a gross outlier is kept out, normals join, and growth stops at the cap."""
    refs = store(redis_conn, min_reference=20, max_reference=40)
    refs.replace("MR/HEAD", normals(5, 30))
    result = refs.admit("MR/HEAD", np.concatenate([far(1), normals(6, 5)]), uids("c", 6))
    assert result.admitted == 5 and "1.2.c.0" not in result.snapshot.uid_set
    full = refs.admit("MR/HEAD", normals(7, 20), uids("d", 20))
    assert full.snapshot.size == 40 and full.admitted == 5
    assert refs.admit("MR/HEAD", normals(8, 3), uids("e", 3)).admitted == 0


def test_an_image_joins_only_once(redis_conn: redis.Redis) -> None:
    """Offering the same SOP UID again (a redone batch) does not add it twice."""
    refs = store(redis_conn)
    refs.admit("CR/CHEST", normals(9, 5), uids("f", 5))
    again = refs.admit("CR/CHEST", normals(9, 5), uids("f", 5))
    assert again.admitted == 0 and again.snapshot.size == 5


def test_readers_follow_appends_and_replacements(redis_conn: redis.Redis) -> None:
    """A cached reader fetches the appended tail, and everything again after a replacement."""
    writer, reader = (
        store(redis_conn),
        store(redis.Redis(connection_pool=redis_conn.connection_pool)),
    )
    writer.replace("CR/CHEST", normals(10, 30))
    assert reader.snapshot("CR/CHEST").size == 30
    writer.admit("CR/CHEST", normals(11, 4), uids("g", 4))
    grown = reader.snapshot("CR/CHEST")
    assert grown.size == 34 and grown.uids[-4:] == uids("g", 4)
    np.testing.assert_array_equal(grown.vectors, writer.snapshot("CR/CHEST").vectors)
    writer.replace("CR/CHEST", normals(12, 25))
    replaced = reader.snapshot("CR/CHEST")
    assert replaced.size == 25
    np.testing.assert_array_equal(replaced.vectors, normals(12, 25))


def test_concurrent_writers_lose_nothing(redis_server: str) -> None:
    """Four workers admitting to one cohort at once: every image joins once, table exact."""
    redis.Redis.from_url(redis_server).flushdb()
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            refs = store(redis.Redis.from_url(redis_server), min_reference=10, max_reference=1000)
            for batch in range(15):
                seed = 100 * worker + batch
                refs.admit("CR/CHEST", normals(seed, 4), uids(str(seed), 4))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    snap = store(redis.Redis.from_url(redis_server), min_reference=10).snapshot("CR/CHEST")
    assert snap.size == 4 * 15 * 4 == len(snap.uid_set)
    np.testing.assert_allclose(snap.table, neighbour_table(snap.vectors, K), atol=1e-6)
    expected = np.sort(scores_from_table(neighbour_table(snap.vectors, K)))
    np.testing.assert_allclose(snap.loo_sorted, expected, atol=1e-6)


def test_stored_k_differing_from_config_is_recomputed(redis_conn: redis.Redis) -> None:
    """A table stored for another k is not trusted: the reader rebuilds it for its own k."""
    store(redis_conn).replace("CR/CHEST", normals(13, 30))
    other = ReferenceStore(
        redis_conn, k=7, min_reference=20, max_reference=200, trim_mads=10.0, dim=DIM
    )
    snap = other.snapshot("CR/CHEST")
    assert snap.table.shape == (30, 7)
    np.testing.assert_allclose(snap.table, neighbour_table(snap.vectors, 7), atol=1e-6)


def test_replace_checks_dimension_and_delete_forgets(redis_conn: redis.Redis) -> None:
    """An import of the wrong dimension is refused; delete removes every key of the cohort."""
    refs = store(redis_conn)
    with pytest.raises(ValueError, match="16-d"):
        refs.replace("CR/CHEST", np.ones((5, 16)))
    refs.replace("CR/CHEST", normals(14, 5))
    refs.delete("CR/CHEST")
    assert not any(redis_conn.exists(key) for key in reference_keys("CR/CHEST").values())
    assert refs.snapshot("CR/CHEST").size == 0 and refs.cohorts() == []
