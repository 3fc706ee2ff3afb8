"""Chaos proof, full size: the real `pacs-embed run` under kill -9, endpoint faults, overload.

    crash     2,000 CT instances over 10 studies; kill -9 of the listener, a worker and Redis,
              20 times at seeded random moments while they arrive; goal: 0 lost, 0 duplicated,
              all final within 60 s of the last kill
    faults    30 % 429/503 with Retry-After, 5 % hangs past the read timeout, a cold start and a
              60 s outage: 100 % embedded, no manual step (recovered_in_s: from the outage's end)
    overload  8 associations x 250 instances at once on a tmpfs spool (root only) filled to the
              watermark: 0xA700, then the space frees and sending resumes (recovered_in_s: from
              then); the listener's peak RSS

Senders are pynetdicom and DCMTK storescu, resending what was not acknowledged like a PACS; the
oracle (tests/chaos.py) reads the ledger, the store and the spool. Each scenario prints one line.
The embeddings come from the local emulator, NOT MedImageInsight.

    .venv/bin/python -m bench.chaos crash|faults|overload|all [--seed N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests import chaos


def crash(workdir: Path, seed: int) -> chaos.Result:
    return chaos.crash(
        workdir,
        instances=2000,
        studies=10,
        kills=20,
        gaps=(1.0, 3.0),
        send_seconds=40.0,
        seed=seed,
        timeout=600.0,
    )


def faults(workdir: Path, seed: int) -> chaos.Result:
    return chaos.faults(
        workdir,
        instances=2000,
        studies=10,
        outage_seconds=60.0,
        cold_start_seconds=20.0,
        seed=seed + 1,
        timeout=900.0,
    )


def overload(workdir: Path, seed: int) -> chaos.Result:
    tiny = chaos.can_mount()
    if not tiny:
        print("overload: not root, so no tmpfs spool: the 0xA700 part is not run", flush=True)
    return chaos.overload(
        workdir,
        associations=8,
        per_association=250,
        size=256,
        spool_mb=400 if tiny else None,
        watermark_mb=16,
        room_mb=60.0,
        seed=seed + 2,
        timeout=600.0,
    )


SCENARIOS: dict[str, Callable[[Path, int], chaos.Result]] = {
    "crash": crash,
    "faults": faults,
    "overload": overload,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="run here and keep state and logs")
    args = parser.parse_args()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    failed = 0
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = (args.keep or Path(tmp)) / name
            workdir.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            result = SCENARIOS[name](workdir, args.seed)
            print(result.line(), flush=True)
            problems = result.problems()
            for line in [*problems, *result.stories]:
                print(f"  {line}", flush=True)
            failed += bool(problems)
            print(f"  ({time.monotonic() - started:.0f} s, log: {workdir / 'daemon.log'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
