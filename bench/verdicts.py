"""Verdicts benchmark: does the detector flag ~alpha of normal images, catch planted outliers,
and notice mislabelled headers? And is scoring cheap next to the endpoint call?

A labelled corpus is built in code (bench/radiographs.py): a stream of chest radiographs that
bootstraps the CR/CHEST reference (gross outliers planted among its first 100 images) until
max_reference, then held-out normals and planted outliers, shuffled. Every image takes the
daemon's real path: DICOM -> pipeline.convert -> the local endpoint over HTTP -> EmbedService
with the detector a worker builds (default settings) -> Redis.

The local endpoint is NOT MedImageInsight: its embedding is a 32x32 thumbnail projected to
1024-d, so these figures measure the detector and its calibration, not the model.

How many held-out normals: at alpha 0.01 the false-flag rate's standard error is
sqrt(0.01 * 0.99 / n); the goal band (0.005-0.015) is +-2.2 standard errors at n = 2000 and
+-2.7 at n = 3000 (the default). A reference of n also varies the rate itself by about
sqrt(alpha * n) / n (~0.0022 at 2000), which is why the reference is filled to max_reference.

    .venv/bin/python -m bench.verdicts [--held-out 3000] [--per-kind 40] [--seed 0] [--skip-perf]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench import radiographs
from bench.verdicts_perf import report_performance
from emulator.server import EmulatorServer, EmulatorSettings
from pacs_embed.compose import build_client
from pacs_embed.processes import PrivateRedis
from pipeline import logs
from pipeline.convert import to_png
from pipeline.detect.detector import Detector, build_detector
from pipeline.jobs import EmbedBatch, ImageItem
from pipeline.ledger import Ledger
from pipeline.records import ImageRecord
from pipeline.settings import Settings
from pipeline.store import EmbeddingStore
from pipeline.verdicts import InstanceVerdict
from workers.service import EmbedService

#: Gross outliers planted among the first 100 images of the bootstrap, by stream position.
BOOTSTRAP_PLANTS = {
    10: "blank frame",
    30: "inverted polarity",
    50: "rotated 90 degrees",
    70: "saturated frame",
    90: "hand radiograph",
}

#: Outlier kinds the emulator's embedding cannot represent: its 32x32 area mean divides pixel
#: noise by ~16, so no detector working on these vectors can see them.
EMULATOR_BLIND = {"heavy noise"}

BATCH = 16


def render(spec: tuple[str, int]) -> tuple[str, bytes, str]:
    """(kind, seed) -> (kind, PNG, body part) through the daemon's conversion."""
    kind, seed = spec
    make = radiographs.chest if kind == "normal" else radiographs.OUTLIERS[kind]
    stored, header = make(np.random.default_rng(seed))
    return kind, to_png(radiographs.dataset(stored, header))[0], header["body_part"]


class Timed:
    """Wraps a callable and records how long each call took."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.calls: list[float] = []

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.calls.append(time.perf_counter() - start)

    def summary(self) -> str:
        ms = 1000 * np.array(self.calls)
        return (
            f"median {np.median(ms):.1f} / p95 {np.percentile(ms, 95):.1f} / mean {ms.mean():.1f}"
        )


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def corpus(
    held_out: int, per_kind: int, reference: int, seed: int = 0
) -> tuple[list[tuple[str, int]], int]:
    """The stream in order, and where the bootstrap part ends (``seed`` draws another corpus)."""
    base = 10_000_000 * seed
    boot = [("normal", base + 1_000_000 + i) for i in range(reference + 100)]
    for position, kind in BOOTSTRAP_PLANTS.items():
        boot.insert(position, (kind, base + 2_000_000 + position))
    rest = [("normal", base + 3_000_000 + i) for i in range(held_out)]
    for j, kind in enumerate(radiographs.OUTLIERS):
        rest += [(kind, base + 4_000_000 + 1000 * j + i) for i in range(per_kind)]
    order = np.random.default_rng(5 + seed).permutation(len(rest))
    return boot + [rest[i] for i in order], len(boot)


def run_corpus(args: argparse.Namespace, connection: redis.Redis) -> None:
    server = EmulatorServer(EmulatorSettings(), port=0)
    server.start_in_thread()
    settings = Settings.load(endpoint={"url": server.url, "auth": "none"})
    specs, boot_end = corpus(args.held_out, args.per_kind, settings.detect.max_reference, args.seed)
    ledger = Ledger(connection)
    store = EmbeddingStore(connection, ledger)
    kinds: dict[str, str] = {}
    started = time.perf_counter()
    # Render first, in parallel; then run the service alone, so its timings are not shared
    # with image generation on the same cores.
    with ProcessPoolExecutor(2) as pool:
        rendered = list(pool.map(render, specs, chunksize=BATCH))
    render_s = time.perf_counter() - started
    with build_client(settings, connection) as client:
        detector = build_detector(settings, connection, client)
        assert detector is not None
        service = EmbedService(client, store, ledger, detector)
        endpoint = client.embed_images = Timed(client.embed_images)  # type: ignore[method-assign]
        assess = detector.assess = Timed(detector.assess)  # type: ignore[method-assign]
        learn = detector.learn = Timed(detector.learn)  # type: ignore[method-assign]
        batch: list[ImageItem] = []
        for n, (kind, png, body) in enumerate(rendered):
            sop, series = f"2.25.{n + 1}", f"2.25.9{n // BATCH + 1}"
            kinds[sop] = kind
            image = ImageRecord(
                sop_instance_uid=sop,
                study_instance_uid="2.25.8",
                series_instance_uid=series,
                modality="CR",
                body_part=body,
            )
            batch.append(ImageItem(image, png))
            if len(batch) == BATCH or n == len(specs) - 1:
                service.run(EmbedBatch(series, tuple(batch)))
                batch = []
    server.shutdown()
    elapsed = time.perf_counter() - started
    verdicts = dict(zip(kinds, store.verdicts(list(kinds)), strict=True))
    stored = {sop: v for sop, v in verdicts.items() if v is not None}
    print(
        f"\nimages: {len(specs)} = bootstrap stream {boot_end} (incl. {len(BOOTSTRAP_PLANTS)} "
        f"planted), {args.held_out} held-out normals, {args.per_kind} x "
        f"{len(radiographs.OUTLIERS)} planted outliers; {len(stored)} verdicts stored"
    )
    report_reference(settings, detector, stored)
    after_bootstrap: dict[str, list[InstanceVerdict]] = {}  # kind -> verdicts, stream order
    for sop in list(kinds)[boot_end:]:
        after_bootstrap.setdefault(kinds[sop], []).append(stored[sop])
    normals = after_bootstrap.get("normal", [])
    report_calibration(settings, normals)
    report_detection({k: after_bootstrap.get(k, []) for k in radiographs.OUTLIERS})
    report_labels({k: after_bootstrap.get(k, []) for k in radiographs.TRUE_LABELS}, normals)
    print(f"\nms per batch of {BATCH} ({len(endpoint.calls)} batches; median / p95 / mean):")
    print(f"  endpoint call (local emulator over HTTP) {endpoint.summary()}")
    print(f"  detector assess (scores, p-values, labels) {assess.summary()}")
    print(f"  detector learn (reference admission)      {learn.summary()}")
    print(f"  run {elapsed:.0f} s, of which rendering the corpus {render_s:.0f} s")


def report_reference(settings: Settings, detector: Detector, stored: dict[str, Any]) -> None:
    d = settings.detect
    snap = detector.references.snapshot("CR/CHEST")
    print(
        f"settings: k={d.k} alpha={d.alpha} min_reference={d.min_reference} "
        f"max_reference={d.max_reference} trim_mads={d.trim_mads}"
    )
    print(f"reference CR/CHEST: {snap.size} images, {snap.state}, version {snap.version}")
    for position, kind in BOOTSTRAP_PLANTS.items():
        v = stored[f"2.25.{position + 1}"]
        fate = "kept in the reference (under the gross-outlier limit at every check)"
        if v.reason == "reference_trim":
            fate = f"trimmed, re-scored p {v.p_value:.4f}, {'flagged' if v.outlier else 'not'}"
        print(f"  planted in bootstrap: {kind:20s} -> {fate}")


def report_calibration(settings: Settings, held: list[InstanceVerdict]) -> None:
    alpha = settings.detect.alpha
    flags = sum(v.outlier for v in held)
    rate = flags / len(held)
    lo, hi = wilson(flags, len(held))
    met = "met" if abs(rate - alpha) <= 0.5 * alpha else "NOT met"
    print(
        f"\nfalse-flag rate on held-out normals: {rate:.4f} ({flags}/{len(held)}), 95% CI "
        f"[{lo:.4f}, {hi:.4f}]; alpha {alpha}, goal {0.5 * alpha:.3f}-{1.5 * alpha:.3f}: {met}"
    )
    p = np.array([v.p_value for v in held])
    print(
        "  P(p <= t): " + ", ".join(f"t={t} {np.mean(p <= t):.4f}" for t in (0.01, 0.05, 0.1, 0.5))
    )


def report_detection(by_kind: dict[str, list[InstanceVerdict]]) -> None:
    print("\ndetection of planted outliers (p < alpha), all sent with header CR/CHEST:")
    hits = {k: sum(v.outlier for v in vs) for k, vs in by_kind.items()}
    for kind, vs in by_kind.items():
        note = (
            "  <- emulator-blind: a 32x32 area mean removes pixel noise"
            if kind in EMULATOR_BLIND
            else ""
        )
        median_p = float(np.median([v.p_value for v in vs]))
        print(f"  {kind:27s} {hits[kind]:3d}/{len(vs):3d}  median p {median_p:.4f}{note}")
    total, found = sum(map(len, by_kind.values())), sum(hits.values())
    seen = [k for k in by_kind if k not in EMULATOR_BLIND]
    seen_found, seen_total = sum(hits[k] for k in seen), sum(len(by_kind[k]) for k in seen)
    print(
        f"  overall {found / total:.3f} ({found}/{total}); kinds the emulator can represent "
        f"{seen_found / seen_total:.3f} ({seen_found}/{seen_total}); goal >= 0.95"
    )


def report_labels(
    mislabelled: dict[str, list[InstanceVerdict]], normals: list[InstanceVerdict]
) -> None:
    print("\nlabel check (zero-shot) on mislabelled headers (header XR/CHEST, picture another):")
    print("  MEANINGLESS with the emulator: its text and image vectors live in unrelated spaces,")
    print("  so these figures only show the check runs end to end; judge it on MedImageInsight.")
    for kind, vs in mislabelled.items():
        truth = radiographs.TRUE_LABELS[kind]
        labelled = [v for v in vs if v.label is not None]
        flagged = np.mean([v.label_mismatch for v in labelled])
        right = np.mean([v.label.predicted_label == truth for v in labelled if v.label])
        print(f"  {kind:27s} mismatch flagged {flagged:.2f}; predicted {truth} {right:.2f}")
    labelled = [v for v in normals if v.label is not None]
    predicted: dict[str, int] = {}
    for v in labelled:
        assert v.label is not None
        predicted[v.label.predicted_label] = predicted.get(v.label.predicted_label, 0) + 1
    print(
        f"  held-out normals (header right): mismatch flagged "
        f"{np.mean([v.label_mismatch for v in labelled]):.3f}; predicted {predicted}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--held-out", type=int, default=3000, help="held-out normal images")
    parser.add_argument("--per-kind", type=int, default=40, help="planted outliers per kind")
    parser.add_argument("--seed", type=int, default=0, help="draw another corpus")
    parser.add_argument("--skip-perf", action="store_true")
    parser.add_argument("--perf-sizes", default="1000,10000,50000")
    args = parser.parse_args()
    logs.configure("warning", "console")
    print("NOTE: embeddings come from the local endpoint emulator, which is NOT MedImageInsight")
    print("(a 32x32 thumbnail projected to 1024-d): figures measure the detector, not the model.")
    with tempfile.TemporaryDirectory() as tmp:
        with PrivateRedis(Path(tmp) / "redis").running() as url:
            connection = redis.Redis.from_url(url)
            run_corpus(args, connection)
            if not args.skip_perf:
                report_performance(connection, [int(n) for n in args.perf_sizes.split(",")])


if __name__ == "__main__":
    main()
