"""The detector's maths, pure numpy: kNN scores, neighbour tables, conformal p-values, trim."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.detect import scoring
from pipeline.detect.scoring import (
    extend_table,
    knn_scores,
    neighbour_table,
    p_values,
    robust_limit,
    scores_from_table,
    top_k,
    trim_bootstrap,
    unit_rows,
)

DIM = 48
K = 5


def cohort(rng: np.random.Generator, n: int, spread: float = 0.5) -> np.ndarray:
    """n unit vectors scattered around one direction (pairwise cosine ~0.8, like a cohort of
    similar images): exchangeable normals."""
    centre = np.zeros(DIM)
    centre[0] = 1.0
    return unit_rows(centre + spread * rng.standard_normal((n, DIM)) / np.sqrt(DIM))


def calibrate(reference: np.ndarray) -> np.ndarray:
    return np.sort(scores_from_table(neighbour_table(reference, K)))


def test_p_values_are_uniform_on_exchangeable_normals() -> None:
    """On normals drawn like the reference, P(p <= t) ~ t for every t (pooled over references)."""
    rng = np.random.default_rng(1)
    pooled = []
    for _ in range(6):
        reference = cohort(rng, 400)
        tests = cohort(rng, 1500)
        scores, _ = knn_scores(tests, reference, K)
        pooled.append(p_values(scores, calibrate(reference)))
    p = np.concatenate(pooled)
    for t in (0.01, 0.05, 0.1, 0.25, 0.5, 0.75):
        observed = float(np.mean(p <= t))
        assert abs(observed - t) <= 0.15 * t + 0.004, f"P(p <= {t}) = {observed:.4f}"


def test_p_values_without_leave_one_out_are_not_uniform() -> None:
    """The uniformity check above can fail: calibrating on self-inclusive scores breaks it."""
    rng = np.random.default_rng(2)
    reference, tests = cohort(rng, 400), cohort(rng, 1500)
    with_self = scores_from_table(top_k(reference @ reference.T, K))  # each row's own 1.0 kept
    scores, _ = knn_scores(tests, reference, K)
    p = p_values(scores, np.sort(with_self))
    assert np.mean(p <= 0.05) > 0.5


def test_planted_far_point_gets_the_smallest_p() -> None:
    """A point unlike every reference vector gets p = 1/(n+1), the floor, and is flagged."""
    rng = np.random.default_rng(3)
    n = 150
    reference = cohort(rng, n)
    far = np.zeros((1, DIM), np.float32)
    far[0, 1] = 1.0
    scores, _ = knn_scores(far, reference, K)
    p = p_values(scores, calibrate(reference))
    assert p[0] == pytest.approx(1 / (n + 1))
    assert p[0] < 0.01


def test_p_values_stay_within_floor_and_one() -> None:
    """Whatever the score, 1/(n+1) <= p <= 1; NaN scores and empty references give NaN."""
    loo = np.sort(np.random.default_rng(4).uniform(0, 1, 99))
    p = p_values(np.array([-5.0, 0.0, 0.5, 1.0, 9.0]), loo)
    assert p.min() == pytest.approx(1 / 100) and p.max() == pytest.approx(1.0)
    assert np.isnan(p_values([np.nan], loo)[0])
    assert np.isnan(p_values([0.3], np.empty(0))[0])


def test_ties_count_against_the_new_image() -> None:
    """A score equal to a reference score counts as 'at least as strange' (valid, not liberal)."""
    loo = np.array([0.1, 0.2, 0.3])
    assert p_values([0.3], loo)[0] == pytest.approx(2 / 4)


def test_top_k_sorts_and_pads() -> None:
    """top_k keeps the k largest per row, descending, padded with -inf when a row is short."""
    rows = np.array([[0.1, 0.9, 0.5, 0.7]], np.float32)
    np.testing.assert_array_equal(top_k(rows, 2), np.array([[0.9, 0.7]], np.float32))
    padded = top_k(rows, 6)
    np.testing.assert_array_equal(padded[0, :4], np.array([0.9, 0.7, 0.5, 0.1], np.float32))
    assert np.all(np.isneginf(padded[0, 4:]))


def test_scores_use_only_present_neighbours() -> None:
    """A row with fewer than k neighbours averages what it has; a row with none is NaN."""
    table = np.array([[0.8, 0.6, -np.inf], [-np.inf, -np.inf, -np.inf]], np.float32)
    scores = scores_from_table(table)
    assert scores[0] == pytest.approx(0.3)
    assert np.isnan(scores[1])


def test_extended_table_equals_a_rebuild() -> None:
    """Appending b vectors incrementally gives the same neighbour table as recomputing it."""
    rng = np.random.default_rng(5)
    reference, new = cohort(rng, 60), cohort(rng, 7)
    table = extend_table(neighbour_table(reference, K), new @ reference.T, new @ new.T, K)
    rebuilt = neighbour_table(np.concatenate([reference, new]), K)
    np.testing.assert_allclose(table, rebuilt, atol=1e-6)


def test_extending_an_empty_reference_works() -> None:
    """The first batch of a cohort builds its table from nothing (short rows padded)."""
    new = cohort(np.random.default_rng(6), 3)
    table = extend_table(np.empty((0, K), np.float32), np.empty((3, 0), np.float32), new @ new.T, K)
    assert table.shape == (3, K)
    assert np.isfinite(table[:, :2]).all() and np.isneginf(table[:, 2:]).all()


def test_neighbour_table_chunks_agree() -> None:
    """Chunking the O(n^2) table build does not change it."""
    reference = cohort(np.random.default_rng(7), 50)
    np.testing.assert_allclose(
        neighbour_table(reference, K, chunk=7), neighbour_table(reference, K), atol=1e-6
    )


def test_trim_removes_planted_outliers_and_keeps_normals() -> None:
    """A bootstrap of normals with 3 planted outliers (two identical) loses exactly those 3."""
    rng = np.random.default_rng(8)
    normals = cohort(rng, 200)
    odd = np.zeros((3, DIM), np.float32)
    odd[0, 1] = odd[1, 1] = 1.0  # a repeated blank frame embeds identically
    odd[2, 2] = 1.0
    keep, table = trim_bootstrap(np.concatenate([normals[:100], odd, normals[100:]]), K, 10.0)
    assert list(np.flatnonzero(~keep)) == [100, 101, 102]
    assert table.shape == (200, K)


def test_trim_never_removes_more_than_its_budget() -> None:
    """Half the bootstrap being 'odd' is heterogeneity, not contamination: at most 10% goes."""
    rng = np.random.default_rng(9)
    spread = np.concatenate([cohort(rng, 50), unit_rows(rng.standard_normal((50, DIM)))])
    keep, _ = trim_bootstrap(spread, K, 1.0)
    assert (~keep).sum() <= int(scoring.MAX_TRIM_FRACTION * 100)


def test_robust_limit_needs_data_and_sits_above_normals() -> None:
    """Too few scores give no limit; on normals the limit sits above (nearly) all of them."""
    assert robust_limit(np.array([0.1, 0.2]), 6.0) == float("inf")
    loo = calibrate(cohort(np.random.default_rng(10), 400))
    assert np.mean(loo > robust_limit(loo, 10.0)) < 0.005


def test_unit_rows_refuses_zero_and_nan() -> None:
    """Vectors without a direction cannot be scored."""
    with pytest.raises(ValueError, match="zero"):
        unit_rows(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="finite"):
        unit_rows(np.array([[np.nan, 1.0]]))
