"""Endpoint throughput: pacs-embed workers vs a bare client and a notebook-style one, against the
local emulator.

The emulator (NOT a medical model: a deterministic function of pixels) runs as `pacs-embed
emulator` with capacity C (requests in flight; past it, 429 as Azure ML answers) and every answer
taking L seconds. Batches of B images give an ideal of C*B/L images/s. Each pacs-embed row runs
real `pacs-embed worker` processes over a private Redis with the fleet-wide limit set to C,
enqueues batches and times until every image is in the store. A worker runs `workers.concurrency`
jobs at once (default 2), so n processes fill at most min(n*j, C) slots: "/ceil." compares with
min(n*j, C)*B/L. "busy" is the share of the C slots' time with a request on the wire (the fleet's
own latency metrics); "429s" and "max in" (most requests ever in flight) are the emulator's counts.

The headline row is the default configuration: `workers.count = 2`, `workers.concurrency = 2`,
limit C. Rows after it, in the same run: the bare client (C threads posting one ready-made body
after another: what this emulator on this host allows at most), the default count one job at a
time per worker (the behaviour before `workers.concurrency`), other worker counts, the most
workers with the limit off (each 429 is retried with back-off), and what the public example
notebooks do: one image per request from 5 threads, sleeping on 429/503 (Retry-After or 1 s)
and trying again.

    .venv/bin/python -m bench.endpoint [--capacity 2] [--latency 0.5] [--batch 16] [--rounds 32]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from PIL import Image
from rq import Queue, Worker

from pipeline.embed.contract import Row, build_request
from pipeline.jobs import EMBED_QUEUE, EmbedBatch, ImageItem, enqueue_batch
from pipeline.keys import EMBEDDED, METRICS
from pipeline.records import ImageRecord
from pipeline.sections import WorkerSettings
from tests.conftest import free_port

KEY = "bench-key"
ENV_DROP = "PACS_EMBED_"


def phantom_pngs(count: int) -> list[bytes]:
    """512x512 8-bit PNGs about the size of a windowed CT slice (~130 kB): body, texture, noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[-1:1:512j, -1:1:512j]
    out = []
    for i in range(count):
        body = np.exp(-((x / 0.8) ** 2 + (y / 0.6) ** 2) * 3) * 200
        texture = 30 * np.sin(8 * x + i) * np.cos(6 * y)
        pixels = np.clip(body + texture + rng.normal(0, 6, x.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def base_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_DROP)}
    env.update(PACS_EMBED_STATE_DIR=str(workdir), PACS_EMBED_LOG__LEVEL="warning")
    return env


@contextmanager
def private_redis(workdir: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _pings(url), "redis-server")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def emulator(workdir: Path, capacity: int, latency: float) -> Iterator[str]:
    """`pacs-embed emulator` in its own process; yields its scoring URL."""
    port = free_port()
    env = base_env(workdir) | {
        "PACS_EMBED_EMULATOR__PORT": str(port),
        "PACS_EMBED_EMULATOR__KEY": KEY,
        "PACS_EMBED_EMULATOR__CAPACITY": str(capacity),
        "PACS_EMBED_EMULATOR__LATENCY_MS": str(latency * 1000),
    }
    proc = subprocess.Popen([sys.executable, "-m", "pacs_embed", "emulator"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(f"{base}/healthz"), "emulator")
        yield f"{base}/score"
    finally:
        proc.terminate()
        proc.wait(10)


def emulator_stats(url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(url.replace("/score", "/stats")).json()
    return stats


def run_workers(
    workdir: Path,
    redis_url: str,
    url: str,
    n: int,
    concurrency: int,
    limit: int,  # 0: no limiter
    warmup: list[EmbedBatch],
    batches: list[EmbedBatch],
) -> tuple[float, float]:
    """With ``n`` worker processes running ``concurrency`` jobs each: seconds from enqueueing
    ``batches`` to every image stored, and the seconds requests spent on the wire meanwhile (from
    the fleet's own metrics).

    ``warmup`` runs first, untimed: each process's first job pays one-off costs (imports, the
    label prompts' text request) that a long-running fleet does not.
    """
    env = base_env(workdir) | {
        "PACS_EMBED_REDIS__URL": redis_url,
        "PACS_EMBED_ENDPOINT__URL": url,
        "PACS_EMBED_ENDPOINT__KEY": KEY,
        "PACS_EMBED_ENDPOINT__MAX_IN_FLIGHT": str(limit),
        "PACS_EMBED_WORKERS__CONCURRENCY": str(concurrency),
    }
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    procs = [
        subprocess.Popen([sys.executable, "-m", "pacs_embed", "worker"], env=env) for _ in range(n)
    ]
    try:
        wait_for(lambda: Worker.count(connection=connection) == n, f"{n} workers")
        queue = Queue(EMBED_QUEUE, connection=connection)
        done = 0
        for stage in (warmup, batches):
            done += sum(len(batch.items) for batch in stage)
            connection.delete(METRICS)
            started = time.perf_counter()
            for batch in stage:
                enqueue_batch(queue, batch, timeout=600, retries=5, retry_intervals=[1])
            while int(connection.scard(EMBEDDED)) < done:
                time.sleep(0.005)
            seconds = time.perf_counter() - started
        wire = float(connection.hget(METRICS, "request_seconds|sum") or 0)
        return seconds, wire
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        connection.close()


def make_batches(run: int, jobs: int, pngs: list[bytes]) -> list[EmbedBatch]:
    batches = []
    for job in range(1, jobs + 1):
        series = f"1.2.826.0.1.{run}.{job}"
        items = tuple(
            ImageItem(
                ImageRecord(
                    sop_instance_uid=f"{series}.{i + 1}",
                    study_instance_uid=f"1.2.826.0.1.{run}",
                    series_instance_uid=series,
                    modality="CT",
                    body_part="CHEST",
                ),
                png,
            )
            for i, png in enumerate(pngs)
        )
        batches.append(EmbedBatch(series, items))
    return batches


def bare_client(url: str, pngs: list[bytes], slots: int, rounds: int) -> float:
    """``slots`` threads, one connection each, posting a ready-made body ``rounds`` times one
    after another: the most this emulator answers on this host, nothing of pacs-embed."""
    body = json.dumps(build_request([Row(image_png=png) for png in pngs])).encode()
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}

    def one_slot(_: int) -> None:
        with httpx.Client(timeout=120) as client:
            for _ in range(rounds):
                client.post(url, content=body, headers=headers).raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(slots) as pool:
        list(pool.map(one_slot, range(slots)))
    return time.perf_counter() - started


def notebook_client(url: str, pngs: list[bytes], threads: int = 5) -> float:
    """One image per request from ``threads`` threads, a new connection each (requests.post)."""

    def one(png: bytes) -> None:
        body = build_request([Row(image_png=png)])
        headers = {"Authorization": f"Bearer {KEY}"}
        for _ in range(100):
            response = httpx.post(url, json=body, headers=headers, timeout=120)
            if response.status_code == 200:
                return
            if response.status_code not in (429, 503):
                response.raise_for_status()
            time.sleep(float(response.headers.get("retry-after", 1)))
        raise RuntimeError("no answer after 100 tries")

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, pngs))
    return time.perf_counter() - started


#: The default configuration, the headline row: `workers.count` and `workers.concurrency`.
DEFAULT_WORKERS = WorkerSettings().count
DEFAULT_CONCURRENCY = WorkerSettings().concurrency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--capacity", type=int, default=2, help="C: emulator capacity = limit")
    parser.add_argument("--latency", type=float, default=0.5, help="L: seconds per request")
    parser.add_argument("--batch", type=int, default=16, help="B: images per request")
    parser.add_argument("--rounds", type=int, default=32, help="requests per slot per row")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 4], help="other rows")
    parser.add_argument("--notebook-images", type=int, default=40)
    args = parser.parse_args()
    c, lat, b = args.capacity, args.latency, args.batch
    ideal = c * b / lat
    pngs = phantom_pngs(b)
    print(
        f"emulator (NOT a medical model): capacity C={c}, latency L={lat:g} s per request, "
        f"batch B={b}, PNG 512x512 ~{np.mean([len(p) for p in pngs]) / 1000:.0f} kB; "
        f"ideal C*B/L = {ideal:.1f} images/s"
    )
    print(
        f"{'client':<40}{'procs':>5}{'images':>7}{'s':>6}{'img/s':>9}{'/ideal':>7}"
        f"{'/ceil.':>9}{'busy':>7}{'429s':>6}{'max in':>8}"
    )
    j = DEFAULT_CONCURRENCY
    # (workers, jobs at once each, limit): the default first, then the comparisons.
    plan = [(DEFAULT_WORKERS, j, c), (DEFAULT_WORKERS, 1, c)]
    plan += [(n, j, c) for n in args.workers if n != DEFAULT_WORKERS]
    plan += [(max([DEFAULT_WORKERS, *args.workers]), j, 0)]
    headline = ""
    with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp)) as redis_url:
        workdir = Path(tmp)
        for run, (n, at_once, limit) in enumerate(plan, start=1):
            slots = min(n * at_once, c)
            jobs = args.rounds * slots
            warmup = make_batches(100 + run, 2 * n * at_once, pngs)
            with emulator(workdir, c, lat) as url:
                batches = make_batches(run, jobs, pngs)
                seconds, wire = run_workers(
                    workdir, redis_url, url, n, at_once, limit, warmup, batches
                )
                stats = emulator_stats(url)
            rate = jobs * b / seconds
            name = f"pacs-embed {n} x {at_once} job{'s' if at_once > 1 else ''}, " + (
                f"limit {limit}" if limit else "no limit"
            )
            busy = wire / (seconds * c)
            row(name, n, jobs * b, seconds, rate, ideal, slots * b / lat, busy, stats)
            if run == 1:
                too_many = stats["statuses"].get("429", 0)
                headline = (
                    f"default configuration ({n} workers x {at_once} jobs, limit {limit}): "
                    f"{rate:.1f} images/s = {rate / ideal:.3f} of ideal, {too_many} 429s"
                )
            if run == 2:  # the bare client, right after the headline
                with emulator(workdir, c, lat) as url:
                    seconds = bare_client(url, pngs, c, args.rounds)
                    stats = emulator_stats(url)
                rate = c * args.rounds * b / seconds
                name = f"bare client: {c} threads, ready bodies"
                row(name, 1, c * args.rounds * b, seconds, rate, ideal, ideal, None, stats)
        notebook = phantom_pngs(args.notebook_images)
        with emulator(workdir, c, lat) as url:
            seconds = notebook_client(url, notebook)
            stats = emulator_stats(url)
        rate = len(notebook) / seconds
        name = "notebook: 1 image/request, 5 threads"
        row(name, 1, len(notebook), seconds, rate, ideal, None, None, stats)
    print(headline)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")


def row(
    name: str,
    procs: int,
    images: int,
    seconds: float,
    rate: float,
    ideal: float,
    ceiling: float | None,
    busy: float | None,
    stats: dict[str, Any],
) -> None:
    too_many = stats["statuses"].get("429", 0)
    of_ceiling = f"{rate / ceiling:.3f}" if ceiling else "-"
    slots = f"{busy:.2f}" if busy is not None else "-"
    print(
        f"{name:<40}{procs:>5}{images:>7}{seconds:>6.1f}{rate:>9.1f}{rate / ideal:>7.3f}"
        f"{of_ceiling:>9}{slots:>7}{too_many:>6}{stats['max_in_flight']:>8}"
    )


def wait_for(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.ConnectionError:
        return False


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
