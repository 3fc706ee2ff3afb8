"""Interop with real senders and real-world files: Orthanc's forward job, and DCMTK's dcmsend.

The corpus is every instance in pydicom's test files and pydicom-data (installed, offline):
each transfer syntax (implicit/explicit little and big endian, deflated, RLE, JPEG baseline,
extended, lossless, JPEG-LS, JPEG 2000), each photometric interpretation (MONOCHROME1/2, RGB,
PALETTE COLOR, YBR_FULL, YBR_FULL_422, YBR_RCT, YBR_ICT), single- and multi-frame CT, MR, CR,
US, NM, SC, enhanced CT/MR, and non-image objects (SR, SEG, RT Dose, RT Plan, RT Struct, ECG).
Left out: files broken on purpose (``BROKEN``) and fixtures that are not instances.

Several files are variants of one instance (the same SOP Instance UID in another transfer
syntax); a PACS and the daemon both keep one copy per UID, so each variant after the first
gets a new SOP Instance UID (``Sample.rewritten``), everything else untouched.

Run with ``-s`` for the per-file outcome table.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.data.data_manager import DATA_ROOT, DataTypes, external_data_sources
from pydicom.uid import UID, generate_uid

from pipeline.keys import EMBEDDED, FAILED, RECEIVED, SKIPPED
from tests.daemon import AE_TITLE, Daemon, dcmtk_env
from tests.orthanc import Orthanc, OrthancError, available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not available(), reason="Orthanc not installed (make test installs it)"),
    pytest.mark.skipif(shutil.which("dcmsend") is None, reason="DCMTK not installed"),
]

README = Path(__file__).resolve().parent.parent / "README.md"
MODALITY = "pacs_embed"  # the daemon's name in Orthanc's DicomModalities

#: Files broken on purpose (pydicom's test_files/README.txt says why), not real-world input.
BROKEN = {
    "MR_truncated.dcm": "Pixel Data cut short",
    "rtplan_truncated.dcm": "data set cut short",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "data set cut short",
    "badVR.dcm": "Number of Frames '1A' is not an IS",
    "JPEG2000-embedded-sequence-delimiter.dcm": "codestream bytes overwritten by a delimiter",
    "JPEG-lossy.dcm": "invalid JPEG SOS; JPGExtended.dcm is its fixed version",
    "SC_rgb_jpeg.dcm": "Implicit VR data set under an explicit syntax: DCMTK cannot parse it",
    "ExplVR_BigEndNoMeta.dcm": "parser fixture: a 24-element fragment",
    "ExplVR_LitEndNoMeta.dcm": "parser fixture: a 24-element fragment",
}
#: Files the DCMTK-based senders cannot send to anyone: stored, but never offered to the daemon.
CANNOT_SEND = {
    # Its UIDs are encoded with VR UN. dcmsend reads SOP Class UID "31" (the first byte, in hex)
    # and sends a C-STORE for that class; Orthanc 1.10 stores and indexes it but its forward job
    # fails with "Cannot transcode from 1.2.840.10008.1.2.4.90 to one of [ ]", to DCMTK's
    # `storescp +xa` as well.
    "explicit_VR-UN.dcm": "UIDs with VR UN: neither Orthanc 1.10 nor dcmsend can send it",
}
#: Fixtures for DICOMDIR reading: directories and the stub instances they index.
FIXTURE_DIRS = ("dicomdirtests", "TINY_ALPHA")

#: SOP classes that are not images to embed, even when they carry Pixel Data (SEG, RT Dose).
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.481.8": "RT Ion Plan",
    "1.2.840.10008.5.1.4.1.1.9.1.1": "12-lead ECG",
}

PENDING_STATES = ("spooled", "converting", "queued")
FINAL_STATES = ("embedded", "skipped", "failed")


@dataclass
class Sample:
    name: str
    path: Path
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    modality: str
    photometric: str
    frames: int
    decodable: bool  # pydicom decodes its pixel data
    identified: bool  # has the Study and Series Instance UIDs every stored instance needs
    rewritten: bool

    @property
    def non_image(self) -> bool:
        name = UID(self.sop_class).name
        return self.sop_class in NON_IMAGE_SOP_CLASSES or name.endswith(("SR Storage", "SR"))


def _source_files() -> list[Path]:
    """What ``get_testdata_files("**/*")`` finds, without its download step: pydicom's own test
    files and the installed pydicom-data, so the corpus never depends on the network."""
    found = set((Path(DATA_ROOT) / "test_files").glob("**/*"))
    for source in external_data_sources().values():
        found.update(Path(p) for p in source.get_paths("**/*", DataTypes.DATASET))
    return sorted(
        (
            f
            for f in found
            if f.is_file() and not set(FIXTURE_DIRS) & set(f.parts) and f.name not in BROKEN
        ),
        key=lambda f: f.name,
    )


def build_corpus(directory: Path) -> tuple[list[Sample], dict[str, str]]:
    """Copy the corpus into ``directory``; returns the samples and {file: why left out}."""
    with warnings.catch_warnings():  # pydicom warns about every quirk these files hold
        warnings.simplefilter("ignore")
        return _build_corpus(directory)


def _build_corpus(directory: Path) -> tuple[list[Sample], dict[str, str]]:
    directory.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    left_out = dict(BROKEN)
    seen: set[str] = set()
    for source in _source_files():
        try:
            ds = dcmread(source, force=True)
            sop_uid, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
        except Exception as exc:  # README.txt, JSON, ICC profiles, data set fragments
            left_out[source.name] = f"not a DICOM instance ({type(exc).__name__})"
            continue
        target = directory / source.name
        rewritten = sop_uid in seen
        if rewritten:
            sop_uid = generate_uid(entropy_srcs=[source.name])
            ds.SOPInstanceUID = sop_uid
            if "MediaStorageSOPInstanceUID" in ds.file_meta:
                ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.save_as(target)
        else:
            shutil.copyfile(source, target)
        seen.add(sop_uid)
        decodable = False
        if "PixelData" in ds:
            try:
                ds.pixel_array  # noqa: B018 - decoding is the check
                decodable = True
            except Exception:  # noqa: S110 - recorded as not decodable
                pass
        ts = ds.file_meta.get("TransferSyntaxUID")
        samples.append(
            Sample(
                name=source.name,
                path=target,
                sop_uid=sop_uid,
                sop_class=sop_class,
                transfer_syntax=UID(ts).name if ts else "(no File Meta)",
                modality=str(ds.get("Modality", "") or "-"),
                photometric=str(ds.get("PhotometricInterpretation", "") or "-"),
                frames=int(ds.get("NumberOfFrames", 1) or 1),
                decodable=decodable,
                identified=all(ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID")),
                rewritten=rewritten,
            )
        )
    return samples, left_out


# -- the daemon's view ----------------------------------------------------------------------------
def ledger(daemon: Daemon) -> redis.Redis:
    url = (daemon.state_dir / "redis" / "url").read_text().strip()
    return redis.Redis.from_url(url)


def outcomes(daemon: Daemon, uids: list[str]) -> dict[str, tuple[str, str]]:
    """{sop uid: (state, reason)} read from the ledger: every UID, not only the recent ones."""
    conn = ledger(daemon)
    try:
        with conn.pipeline() as pipe:
            for uid in uids:
                pipe.sismember(RECEIVED, uid)
                pipe.sismember(EMBEDDED, uid)
                pipe.hget(SKIPPED, uid)
                pipe.hget(FAILED, uid)
            flags = pipe.execute()
    finally:
        conn.close()
    out = {}
    for i, uid in enumerate(uids):
        received, embedded, skipped, failed = flags[4 * i : 4 * i + 4]
        if embedded:
            out[uid] = ("embedded", "")
        elif skipped is not None:
            out[uid] = ("skipped", skipped.decode())
        elif failed is not None:
            record = json.loads(failed)
            out[uid] = ("failed", f"{record['stage']}: {record['reason']}")
        elif received:
            out[uid] = ("pending", "")
        else:
            out[uid] = ("not received", "")
    return out


def pending(status: dict[str, Any]) -> int:
    return sum(int(status["instances"][state]) for state in PENDING_STATES)


def wait_final(daemon: Daemon, expected: int, timeout: float = 90.0) -> dict[str, Any]:
    """Until ``expected`` instances are received and none is spooled, converting or queued."""

    def done() -> bool:
        status = daemon.status()
        return status["instances"]["received"] >= expected and pending(status) == 0

    daemon.wait_for(done, timeout, f"{expected} instances in a final state")
    return daemon.status()


def check_counts(status: dict[str, Any]) -> list[str]:
    counts = status["instances"]
    parts = sum(int(counts[state]) for state in (*PENDING_STATES, *FINAL_STATES))
    if counts["received"] != parts:
        return [f"/status instances do not add up: {counts}"]
    return []


def check_status_lists(status: dict[str, Any], found: dict[str, tuple[str, str]]) -> list[str]:
    """/status's recent failures and skips agree with the ledger (when the document has them)."""
    problems = []
    listed = [("failed", f, f"{f['stage']}: {f['reason']}") for f in status.get("failures", [])]
    skips = status.get("skipped", {}).get("recent", [])
    listed += [("skipped", s, s["reason"]) for s in skips]
    for state, entry, reason in listed:
        uid = entry["sop_instance_uid"]
        if uid in found and found[uid] != (state, reason):
            problems.append(f"/status lists {uid} as {state} ({reason}); ledger: {found[uid]}")
    return problems


def check_outcomes(samples: list[Sample], found: dict[str, tuple[str, str]]) -> list[str]:
    """Non-image objects end skipped; an identified image pydicom decodes never ends failed."""
    problems = []
    for s in samples:
        state, reason = found[s.sop_uid]
        if state not in FINAL_STATES:
            problems.append(f"{s.name}: {state}")
        elif s.non_image and state != "skipped":
            problems.append(f"{s.name} ({UID(s.sop_class).name}) is not an image, but {state}")
        elif not s.non_image and s.decodable and s.identified and state == "failed":
            problems.append(f"{s.name}: decodable image failed: {reason}")
    return problems


def table(samples: list[Sample], found: dict[str, tuple[str, str]], extra: dict[str, str]) -> str:
    rows = [("file", "transfer syntax", "SOP class", "mod", "photometric", "fr", "outcome")]
    for s in samples:
        state, reason = found[s.sop_uid]
        note = "; ".join(x for x in (reason, extra.get(s.name, "")) if x)
        rows.append(
            (
                s.name + ("*" if s.rewritten else ""),
                s.transfer_syntax.replace(" Image Compression", ""),
                UID(s.sop_class).name.replace(" Storage", ""),
                s.modality,
                s.photometric,
                str(s.frames),
                f"{state}: {note}" if note else state,
            )
        )
    widths = [min(max(len(row[i]) for row in rows), 44) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell[:w].ljust(w) for cell, w in zip(row[:-1], widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    ]
    return "\n".join(lines) + "\n(* new SOP Instance UID: a variant of another file's instance)"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Sample], dict[str, str]]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


# -- Orthanc forwards a real-world study mix ------------------------------------------------------
def test_orthanc_forwards_real_world_files(
    corpus: tuple[list[Sample], dict[str, str]], daemon: Daemon, tmp_path: Path
) -> None:
    """Orthanc's default forward job (non-permissive) of every file succeeds; each ends final."""
    samples, left_out = corpus
    started = time.monotonic()
    daemon.start()
    with Orthanc(tmp_path / "orthanc", {MODALITY: (AE_TITLE, daemon.dicom_port)}) as pacs:
        refused: dict[str, str] = {}
        ids: dict[str, str] = {}  # file -> Orthanc instance id
        for s in samples:
            try:
                ids[s.name] = pacs.upload(s.path)["ID"]
            except OrthancError as exc:
                refused[s.name] = str(exc).split(": ", 1)[1]
        stored = [s for s in samples if s.name in ids and s.name not in CANNOT_SEND]
        uploaded = time.monotonic()

        job = pacs.forward(MODALITY, [ids[s.name] for s in stored])
        forwarded = time.monotonic()
        extra = {name: f"Orthanc refused the upload: {why}" for name, why in refused.items()}
        extra.update({name: f"not forwarded: {why}" for name, why in CANNOT_SEND.items()})
        if job["State"] != "Success":
            # Diagnosis only: which instances the daemon did not take, each sent on its own.
            got = outcomes(daemon, [s.sop_uid for s in stored])
            for s in stored:
                if got[s.sop_uid][0] == "not received":
                    try:
                        pacs.store(MODALITY, [ids[s.name]], synchronous=True)
                        extra[s.name] = "missed by the failed job; a resend alone succeeded"
                    except OrthancError as exc:
                        extra[s.name] = f"forward failed: {str(exc).split(': ', 1)[1]}"

    if job["State"] == "Success":
        expected = len(stored)
    else:  # the diagnosis above sent what it could: count what arrived
        got = outcomes(daemon, [s.sop_uid for s in stored])
        expected = sum(1 for s in stored if got[s.sop_uid][0] != "not received")
    status = wait_final(daemon, expected)
    finished = time.monotonic()
    found = outcomes(daemon, [s.sop_uid for s in samples])
    print(f"\n{len(samples)} files, {len(stored)} stored by Orthanc, job {job['State']}")
    print(table(samples, found, extra))
    print("left out:", json.dumps(left_out, indent=1))
    print(f"/status instances: {status['instances']}, input: {status.get('input')}")
    print(
        f"timings: daemon+upload {uploaded - started:.1f} s, forward {forwarded - uploaded:.1f} s,"
        f" to final {finished - forwarded:.1f} s"
    )

    problems = []
    if job["Content"]["InstancesCount"] != len(stored) or job["Content"]["FailedInstancesCount"]:
        problems.append(f"job counts: {job['Content']} for {len(stored)} instances")
    if job["State"] != "Success":
        content = {k: v for k, v in job.get("Content", {}).items() if k != "ParentResources"}
        why = (job.get("ErrorDescription"), job.get("ErrorDetails", ""), content)
        problems.append(f"forward job {job['State']}: {why}")
    problems += [f"{name}: {why}" for name, why in extra.items() if "forward failed" in why]
    problems += check_counts(status) + check_status_lists(status, found)
    if status["instances"]["received"] != expected:
        problems.append(f"received {status['instances']['received']} != {expected} sent")
    problems += check_outcomes(stored, found)
    # Orthanc refuses only instances without the Patient/Study/Series identifiers it indexes.
    unidentified = {s.name for s in samples if not s.identified}
    problems += [
        f"Orthanc refused {name}: {why}"
        for name, why in refused.items()
        if name not in unidentified
    ]
    assert not problems, "\n".join(problems)


# -- README: dcmsend a mixed folder ---------------------------------------------------------------
def readme_send_command() -> str:
    """The dcmsend line of README's "### Send a study", exactly as an operator would copy it."""
    section = README.read_text().split("### Send a study", 1)[1].split("\n### ", 1)[0]
    blocks = section.split("```")[1::2]  # the fenced code blocks
    commands = [line for block in blocks for line in block.splitlines() if "dcmsend " in line]
    assert len(commands) == 1, f"README's Send a study must hold one dcmsend command: {commands}"
    return commands[0].split("#", 1)[0].strip()


def test_readme_dcmsend_sends_a_mixed_folder(
    corpus: tuple[list[Sample], dict[str, str]], daemon: Daemon, tmp_path: Path
) -> None:
    """README's dcmsend command, on a folder of mixed compressed files: every one acknowledged."""
    samples = [s for s in corpus[0] if s.name not in CANNOT_SEND]
    folder = tmp_path / "study"
    for s in samples:  # a tree, as a CD or an export would be
        sub = folder / s.modality.lower().replace("-", "other")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s.path, sub / s.name)
    # What else such a folder holds: a DICOMDIR and a text file, to be passed over.
    shutil.copyfile(get_testdata_file("DICOMDIR-reordered"), folder / "DICOMDIR")
    (folder / "README.TXT").write_text("Study exported for review.\n")
    command = readme_send_command()
    argv = shlex.split(command)
    env = dcmtk_env()
    while argv and "=" in argv[0]:  # leading VAR=value assignments
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    assert argv[0] == "dcmsend", command
    argv = [{"11112": str(daemon.dicom_port), "DIR": str(folder)}.get(a, a) for a in argv]
    daemon.start()
    started = time.monotonic()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    sent = time.monotonic()
    output = result.stdout + result.stderr
    summary = output[output.find("Status Summary") :]
    print(f"\n$ {command}\n{summary}")
    assert result.returncode == 0, output[-4000:]
    counts = dict(re.findall(r"^I: [-* ]*(.+?) +: (\d+)$", summary, re.MULTILINE))
    n = str(len(samples))
    assert counts.get("Number of SOP instances") == n, summary
    assert counts.get("sent to the peer") == counts.get("with status SUCCESS") == n, summary
    status = wait_final(daemon, len(samples))
    print(
        f"dcmsend {sent - started:.1f} s, to final {time.monotonic() - sent:.1f} s;"
        f" {status['instances']}"
    )
    found = outcomes(daemon, [s.sop_uid for s in samples])
    not_embedded = [s for s in samples if found[s.sop_uid][0] != "embedded"]
    print(table(not_embedded, found, {}))
    problems = check_counts(status) + check_status_lists(status, found)
    problems += check_outcomes(samples, found)
    assert status["instances"]["received"] == len(samples)
    assert not problems, "\n".join(problems)
