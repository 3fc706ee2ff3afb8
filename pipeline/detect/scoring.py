"""Outlier scores and conformal p-values, in pure numpy (no I/O, no state).

Score of an image = mean cosine distance to its k nearest neighbours in its cohort's reference
set. Vectors are L2-normalised, so cosine similarity is a dot product and a whole batch is one
matrix product.

Calibration needs no labels. Each reference vector gets a leave-one-out (LOO) score: the same
score computed against the other n-1 vectors. If a new image and the reference images are
exchangeable (drawn alike), the new score's rank among the LOO scores is uniform, so

    p = (1 + #{LOO scores >= s}) / (n + 1)

is a valid conformal p-value: P(p <= a) <= a for a normal image, whatever the embedding model.
Flagging p < alpha therefore flags ~alpha of normal images, by construction. The smallest p a
reference of n can give is 1/(n+1): with fewer than 1/alpha images nothing can ever be flagged.
A new image is scored against n vectors while a LOO score sees n-1, so new scores run slightly
low: the error is on the conservative side (fewer false flags, never more).

LOO scores are kept as a "neighbour table": for each reference vector, its k highest
similarities to the others, sorted descending (``-inf`` where fewer than k others exist). A new
member only changes the rows it enters, so admitting b images costs O(n*(k+b)) beyond the
matrix product already paid for scoring them, instead of the O(n^2 d) of recomputing.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float32]
Doubles = npt.NDArray[np.float64]

#: Rows of the reference processed per matrix product when building a neighbour table, so
#: memory stays ~chunk * n * 4 bytes (64 MB at n = 16k) instead of n^2.
TABLE_CHUNK = 1024

#: Scale from the median absolute deviation to a standard deviation, for normal data.
MAD_TO_SIGMA = 1.4826

#: The bootstrap trim never removes more than this fraction of a bootstrap: beyond it the
#: cohort is heterogeneous rather than contaminated, and trimming would bias the reference.
MAX_TRIM_FRACTION = 0.1


def unit_rows(vectors: npt.ArrayLike) -> Floats:
    """``vectors`` as float32 rows of length 1; ValueError for non-finite or zero rows."""
    array = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    if array.ndim != 2 or not np.all(np.isfinite(array)):
        raise ValueError("vectors must be a finite 2-D array")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a zero vector has no direction")
    out: Floats = (array / norms).astype(np.float32)
    return out


def top_k(similarities: Floats, k: int) -> Floats:
    """The k largest values of each row, sorted descending, padded with ``-inf`` to width k."""
    rows, width = similarities.shape
    if width > k:
        part = np.partition(similarities, width - k, axis=1)[:, width - k :]
    else:
        part = np.concatenate(
            [similarities, np.full((rows, k - width), -np.inf, dtype=np.float32)], axis=1
        )
    out: Floats = np.ascontiguousarray(-np.sort(-part, axis=1), dtype=np.float32)
    return out


def scores_from_table(table: Floats) -> Doubles:
    """Mean cosine distance over each row's present neighbours; NaN for a row with none."""
    present = np.isfinite(table)
    count = present.sum(axis=1)
    total = np.where(present, 1.0 - table.astype(np.float64), 0.0).sum(axis=1)
    out = np.full(table.shape[0], np.nan)
    np.divide(total, count, out=out, where=count > 0)
    return out


def knn_scores(queries: Floats, reference: Floats, k: int) -> tuple[Doubles, Floats]:
    """Scores of ``queries`` against ``reference`` and the similarity matrix (for reuse)."""
    similarities = queries @ reference.T
    return scores_from_table(top_k(similarities, k)), similarities


def neighbour_table(reference: Floats, k: int, chunk: int = TABLE_CHUNK) -> Floats:
    """The LOO neighbour table of ``reference`` from scratch: O(n^2 d), chunked."""
    n = reference.shape[0]
    table = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        block = reference[start : start + chunk] @ reference.T
        rows = np.arange(block.shape[0])
        block[rows, start + rows] = -np.inf  # leave one out: never your own neighbour
        table[start : start + chunk] = top_k(block, k)
    return table


def extend_table(table: Floats, new_vs_reference: Floats, new_vs_new: Floats, k: int) -> Floats:
    """The neighbour table after appending b vectors to a reference of n.

    ``new_vs_reference`` is (b, n), ``new_vs_new`` is (b, b) (its diagonal is ignored). Equal to
    ``neighbour_table`` of the grown reference, up to the order of tied similarities.
    """
    old_rows = top_k(np.concatenate([table, new_vs_reference.T], axis=1), k)
    among_new = np.array(new_vs_new, dtype=np.float32, copy=True)
    np.fill_diagonal(among_new, -np.inf)
    new_rows = top_k(np.concatenate([new_vs_reference, among_new], axis=1), k)
    return np.concatenate([old_rows, new_rows])


def p_values(scores: npt.ArrayLike, loo_sorted: Doubles) -> Doubles:
    """Conformal p-values of ``scores`` given the reference's LOO scores sorted ascending.

    NaN scores give NaN; an empty reference gives NaN (there is nothing to rank against).
    """
    s = np.asarray(scores, dtype=np.float64)
    n = loo_sorted.shape[0]
    if n == 0:
        return np.full(s.shape, np.nan)
    at_least = n - np.searchsorted(loo_sorted, s, side="left")
    out = (1.0 + at_least) / (n + 1.0)
    return np.where(np.isnan(s), np.nan, out)


def robust_limit(loo_scores: Doubles, mads: float) -> float:
    """``median + mads * sigma`` of the LOO scores, sigma from the MAD; infinity when there are
    too few scores to say anything.

    kNN distances of normal images have a long right tail, and every normal image above the
    limit that is kept out of a reference adds to the false-flag rate; so the limit must sit far
    out (10 sigmas by default: on bench/verdicts' normals ~0.05% exceed it at n = 2000) and only
    catches gross outliers (blank, inverted, rotated frames score 3-4x the normal maximum).
    A log scale was tried and rejected: near-duplicate images give tiny distances whose logs
    inflate the spread until the limit exceeds any possible score.
    """
    finite = loo_scores[np.isfinite(loo_scores)]
    if finite.size < 3:
        return float("inf")
    median = float(np.median(finite))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(finite - median)))
    return median + mads * max(sigma, 1e-6)


def trim_bootstrap(
    reference: Floats,
    k: int,
    mads: float,
    max_fraction: float = MAX_TRIM_FRACTION,
    table: Floats | None = None,
) -> tuple[npt.NDArray[np.bool_], Floats]:
    """Which reference vectors to keep, and the kept vectors' neighbour table.

    The first images of a cohort may hold a few gross outliers (a blank frame, a mislabelled
    series); left in, they would calibrate the threshold to accept their kind. Drop the vectors
    whose LOO score is above ``robust_limit``, at most ``max_fraction`` of the set (the highest
    first), and repeat once the table is rebuilt (an outlier can hide another), up to three
    rounds. ``table``: the current neighbour table, if known (saves the first O(n^2 d) build).
    """
    n = reference.shape[0]
    keep = np.ones(n, dtype=bool)
    budget = int(max_fraction * n)
    if table is None:
        table = neighbour_table(reference, k)
    for _ in range(3):
        scores = scores_from_table(table)
        over = np.flatnonzero(scores > robust_limit(scores, mads))
        if over.size == 0 or budget == 0:
            break
        over = over[np.argsort(-scores[over])][:budget]
        budget -= over.size
        kept_idx = np.flatnonzero(keep)
        keep[kept_idx[over]] = False
        table = neighbour_table(reference[keep], k)
    return keep, table
