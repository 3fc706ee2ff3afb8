"""Ingest benchmark: DCMTK storescu -> pacs-embed vs storescu -> DCMTK storescp, same run.

Prints images/s for the C-STORE leg against each receiver (ratio: ours / storescp), and the
end-to-end rate until every image is embedded by the local emulator (NOT MedImageInsight).

    .venv/bin/python -m bench.ingest [--images 200] [--size 512]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from tests import factory
from tests.conftest import free_port
from tests.daemon import Daemon, dcmtk_env, storescu, successes


def timed_send(port: int, files: list[Path]) -> float:
    start = time.perf_counter()
    result = storescu(port, files)
    elapsed = time.perf_counter() - start
    if successes(result) != len(files):
        raise SystemExit(f"storescu failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return elapsed


def storescp_reference(files: list[Path], workdir: Path) -> float:
    port = free_port()
    out = workdir / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-aet", "PACS_EMBED", "-od", str(out), "--fork", str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        return timed_send(port, files)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        series = factory.ct_series(args.images, rows=args.size, columns=args.size, identical=None)
        files = [factory.write(ds, workdir / f"{i:05d}.dcm") for i, ds in enumerate(series)]
        reference = storescp_reference(files, workdir)

        daemon = Daemon(workdir / "var", workdir / "daemon.log", LOG__LEVEL="warning")
        daemon.start()
        try:
            start = time.perf_counter()
            ours = timed_send(daemon.dicom_port, files)
            daemon.wait_embedded(args.images, timeout=600)
            total = time.perf_counter() - start
        finally:
            daemon.stop()

    n = args.images
    print(f"images: {n} CT {args.size}x{args.size} int16, one association, loopback")
    print(f"C-STORE to DCMTK storescp : {n / reference:8.1f} images/s (reference)")
    print(
        f"C-STORE to pacs-embed     : {n / ours:8.1f} images/s "
        f"(ratio {reference / ours:.2f} of storescp's rate)"
    )
    print(
        f"stored -> all embedded    : {n / total:8.1f} images/s end to end "
        "(local emulator, not MedImageInsight)"
    )


if __name__ == "__main__":
    main()
