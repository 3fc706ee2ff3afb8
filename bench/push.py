"""Results-back benchmark: a study's last C-STORE -> its SR in a real Orthanc, and retention.

1. ``latency``: `pacs-embed run` with the local emulator (NOT MedImageInsight) and Orthanc as the
   DICOM sink; DCMTK storescu sends a ``--slices`` study; prints the time from the last C-STORE's
   answer to the SR being in Orthanc, against the goal ``stable_seconds + 5``, and when (from
   the daemon's log) the version completed and the SR was pushed.
2. ``spool``: reconciliation and retention over a spool of ``--instances`` files (tiny ones:
   the walk and the Redis round trips are what is measured), all final in the ledger; prints
   reconciliation's time and the files retention deletes per second.

    .venv/bin/python -m bench.push latency [--slices 200] [--stable 5]
    .venv/bin/python -m bench.push spool [--instances 100000]
    .venv/bin/python -m bench.push sr [--images 200]

3. ``sr``: building a ``--images`` study's SR as pipeline/results/sr.py does (highdicom gets
   the study group only; the document then takes the full content tree) against handing
   highdicom the full tree, in the same run; the two documents must be equal.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import redis

from dicom_listener.reconcile import reconcile
from dicom_listener.retention import Retention
from dicom_listener.spool import Spool
from pacs_embed.processes import PrivateRedis
from pipeline.ledger import Ledger
from tests import factory, orthanc
from tests.daemon import Daemon, storescu, successes
from tests.orthanc import Orthanc

#: Settings both latency benches give the daemon: a series' batch waits this little for more.
LATENCY_SETTINGS = {"QUEUE__LINGER_SECONDS": "0.3"}


def dicom_sink_env(pacs: Orthanc) -> dict[str, str]:
    """The daemon's settings that make ``pacs`` its DICOM sink (SR/KOS go there)."""
    return {
        "PACS_EMBED_SINKS__DICOM__HOST": "127.0.0.1",
        "PACS_EMBED_SINKS__DICOM__PORT": str(pacs.dicom_port),
        "PACS_EMBED_SINKS__DICOM__AE_TITLE": orthanc.AE_TITLE,
    }


def study_files(directory: Path, slices: int) -> tuple[str, list[Path]]:
    """A fresh one-series CT study of ``slices`` 512x512 slices as files; (its UID, the files)."""
    study, series = factory.new_uid(), factory.new_uid()
    files = [
        factory.write(
            factory.ct_slice(study_uid=study, series_uid=series, instance_number=i),
            directory / f"{i}.dcm",
        )
        for i in range(1, slices + 1)
    ]
    return study, files


@dataclass(frozen=True)
class SrLatency:
    """A study's last C-STORE answer -> its SR in the PACS, and when (from the daemon's log,
    relative to that answer) the study completed and its SR was pushed."""

    slices: int
    stable: float
    seconds: float
    phases: dict[str, float]

    def line(self) -> str:
        goal = self.stable + 5
        return (
            f"latency: {self.slices}-slice study, last C-STORE -> SR in Orthanc "
            f"{self.seconds:.1f} s (study.stable_seconds {self.stable:g}; goal <= {goal:g} s: "
            f"{self.seconds / goal:.2f} of the goal); "
            + ", ".join(f"{name} at +{at:.1f} s" for name, at in self.phases.items())
        )


def sr_latency(
    daemon: Daemon, pacs: Orthanc, study: str, files: list[Path], stable: float
) -> SrLatency:
    """Send ``study``'s ``files`` to a running ``daemon`` whose DICOM sink is ``pacs`` (one
    storescu association) and wait for the study's SR there."""
    sent = storescu(daemon.dicom_port, files)
    last_store = time.monotonic()
    if successes(sent) != len(files):
        raise SystemExit(f"storescu failed:\n{sent.stdout[-2000:]}")
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study, "Modality": "SR"}}
    daemon.wait_for(lambda: bool(pacs.post("/tools/find", query)), 600, "the SR")
    took = time.monotonic() - last_store
    stored_at = time.time() - took
    wanted = {"completed": "study.completed", "pushed": "push.sent"}
    deadline = time.monotonic() + 5  # push.sent is logged once the KOS has followed the SR
    while not set(wanted.values()) <= (events := _events(daemon, study)).keys():
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    phases = {
        name: _unix(events[event]["timestamp"]) - stored_at
        for name, event in wanted.items()
        if event in events
    }
    return SrLatency(len(files), stable, took, phases)


def _events(daemon: Daemon, study: str) -> dict[str, dict[str, str]]:
    """The daemon's first log line of each event about ``study`` (version 1's)."""
    events: dict[str, dict[str, str]] = {}
    for event in daemon.log_lines():
        if event.get("study_instance_uid") == study:
            events.setdefault(str(event.get("event")), event)
    return events


def latency(slices: int, stable: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        daemon = Daemon(
            work / "var",
            work / "daemon.log",
            STUDY__STABLE_SECONDS=str(stable),
            **LATENCY_SETTINGS,
        )
        with Orthanc(work / "orthanc", {"pe": ("PACS_EMBED", daemon.dicom_port)}) as pacs:
            daemon.env.update(dicom_sink_env(pacs))
            study, files = study_files(work, slices)
            daemon.start()
            try:
                result = sr_latency(daemon, pacs, study, files, stable)
            finally:
                daemon.stop()
    print(result.line())


def _unix(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def spool(instances: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with PrivateRedis(work / "redis").running() as url:
            conn = redis.Redis.from_url(url)
            store = Spool(work / "spool", work / "quarantine")
            uids = [f"1.2.826.0.1.3680043.10.{n}" for n in range(instances)]
            for uid in uids:
                path = store.path_for(uid)
                path.write_bytes(b"\0" * 132)
            ledger = Ledger(conn)
            for start in range(0, instances, 5000):
                part = uids[start : start + 5000]
                ledger.spooled(part)
                for uid in part:
                    ledger.skipped(uid, "bench")
            submitted: list[Path] = []
            started = time.perf_counter()
            counts = reconcile(store, ledger, conn, submitted.append)
            walked = time.perf_counter() - started
            retention = Retention(store, conn, hours=1e-9, low_free_bytes=0)
            retention.eligible(uids)
            started = time.perf_counter()
            deleted = retention.clean()
            cleaned = time.perf_counter() - started
    print(
        f"spool: reconciliation of {instances} final instances {walked:.1f} s "
        f"({instances / walked:,.0f}/s, resubmitted {counts['resubmitted']}); "
        f"retention deleted {deleted} files in {cleaned:.1f} s ({deleted / cleaned:,.0f}/s)"
    )


def sr(images: int) -> None:
    from highdicom.sr import ComprehensiveSR

    from pipeline.results import Algorithm, ResultIdentity, build_report
    from pipeline.results import sr as module
    from pipeline.verdicts import InstanceVerdict, series_verdict, study_verdict
    from tests.test_results_dicom import verdict

    study, series = factory.new_uid(), factory.new_uid()
    sources = [
        factory.ct_slice(study_uid=study, series_uid=series, instance_number=i, rows=16)
        for i in range(1, images + 1)
    ]
    verdicts: list[InstanceVerdict] = [verdict(ds) for ds in sources]
    whole = study_verdict(study, [series_verdict(series, verdicts)])
    args = dict(identity=ResultIdentity(study, 1), predecessor=None, now=datetime.now(UTC))
    algorithm = Algorithm(model_version="bench", software_version="bench")

    def build() -> tuple[float, object]:
        started = time.perf_counter()
        report = build_report(sources, verdicts, whole, algorithm=algorithm, **args)  # type: ignore[arg-type]
        return time.perf_counter() - started, report

    ours, fast = build()
    full_tree: list[object] = []

    class Reference(ComprehensiveSR):  # highdicom handed the whole tree, as it is documented
        def __init__(self, *a: object, content: object, **k: object) -> None:
            super().__init__(*a, content=full_tree[-1] if full_tree else content, **k)

    made = module._report

    def keep(groups: object) -> object:
        report = made(groups)  # type: ignore[arg-type]
        if len(groups) > 1:  # type: ignore[arg-type]
            full_tree.append(report)
        return report

    module.ComprehensiveSR, module._report = Reference, keep  # type: ignore[assignment, misc]
    try:
        reference, slow = build()
    finally:
        module.ComprehensiveSR, module._report = ComprehensiveSR, made  # type: ignore[misc]
    same = fast.ContentSequence == slow.ContentSequence  # type: ignore[attr-defined]
    print(
        f"sr: {images}-image report built in {ours:.2f} s, highdicom given the full tree "
        f"{reference:.2f} s ({reference / ours:.1f}x); documents equal: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--slices", type=int, default=200)
    lat.add_argument("--stable", type=float, default=5.0)
    sp = sub.add_parser("spool")
    sp.add_argument("--instances", type=int, default=100_000)
    report = sub.add_parser("sr")
    report.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    if args.what == "latency":
        latency(args.slices, args.stable)
    elif args.what == "spool":
        spool(args.instances)
    else:
        sr(args.images)


if __name__ == "__main__":
    main()
