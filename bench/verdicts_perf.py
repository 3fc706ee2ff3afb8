"""Scoring cost at 1k / 10k / 50k reference vectors, for bench/verdicts.

Synthetic 1024-d unit vectors clustered like one cohort (the cost of numpy brute force does
not depend on where the vectors come from). Per size: the worker's steady-state assess (cached
snapshot: one HMGET + matrix product + top-k + p-values), one admission (WATCH transaction,
incremental neighbour table), a cold snapshot load from Redis, and the full leave-one-out
recompute that the cached neighbour table avoids.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.detect.detector import Detector, reference_store
from pipeline.detect.scoring import neighbour_table, unit_rows
from pipeline.settings import DetectSettings

BATCH = 16
COHORT = "CR/CHEST"


@dataclass(frozen=True)
class _Image:
    sop_instance_uid: str
    series_instance_uid: str = "2.25.1"
    study_instance_uid: str = "2.25.2"
    modality: str = "CR"
    body_part: str = "CHEST"


def _cluster(rng: np.random.Generator, n: int) -> np.ndarray:
    centre = np.zeros(1024)
    centre[0] = 1.0
    return unit_rows(centre + 0.5 * rng.standard_normal((n, 1024)) / 32.0)


def _best_ms(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def _measure(connection: Any, n: int, capacity: int, rng: np.random.Generator) -> str:
    """One table row for a reference of ``n`` vectors."""
    connection.flushdb()
    settings = DetectSettings(max_reference=capacity)
    refs = reference_store(settings, connection)
    vectors = _cluster(rng, n)
    start = time.perf_counter()
    neighbour_table(vectors, settings.k)
    rebuild_s = time.perf_counter() - start
    refs.replace(COHORT, vectors)  # computes the table again and writes it
    detector = Detector(settings, refs)
    queries = _cluster(rng, BATCH)
    images = [_Image(f"2.25.9.{i}") for i in range(BATCH)]
    detector.assess(images, queries)  # warm the snapshot cache, as a worker's second batch is
    assess_ms = _best_ms(lambda: detector.assess(images, queries), 10) / BATCH
    batches = iter(range(10_000))

    def admit() -> None:
        b = next(batches)
        refs.admit(COHORT, _cluster(rng, BATCH), [f"2.25.{b}.{i}" for i in range(BATCH)])

    admit_ms = _best_ms(admit, 5)
    cold_ms = _best_ms(lambda: reference_store(settings, connection).snapshot(COHORT), 3)
    megabytes = connection.info("memory")["used_memory"] / 1e6
    return (
        f"{n:>10} {assess_ms:>14.3f} {admit_ms:>15.1f} {cold_ms:>13.1f} "
        f"{rebuild_s:>19.2f} {megabytes:>9.0f}"
    )


def report_performance(connection: Any, sizes: list[int]) -> None:
    print(f"\nscoring cost, numpy brute force on {os.cpu_count()} cores (best of repeats):")
    print(
        f"{'reference':>10} {'assess ms/img':>14} {'admit ms/batch':>15} {'cold load ms':>13} "
        f"{'full LOO rebuild s':>19} {'Redis MB':>9}"
    )
    rng = np.random.default_rng(7)
    capacity = max(*sizes, 2000) + 1000
    for n in sizes:
        print(_measure(connection, n, capacity, rng), flush=True)
    print(
        "assess = what every embed job pays per image (cached snapshot); admit = per batch of "
        f"{BATCH} while a reference grows;\ncold load = a worker's first batch of a cohort; "
        "full LOO rebuild = what each admission would cost without the cached neighbour table."
    )
