"""Resends, corrections and spool retention, through `pacs-embed run` and a webhook receiver.

A byte-identical resend stays a no-op, whether the first copy is still spooled or retention
deleted it after delivery; a resend with different bytes is a correction: it replaces the
spooled copy, is embedded again, and opens a new version of its study whose results supersede
the last.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset

from dicom_listener.spool import Spool
from tests import factory
from tests.daemon import Daemon, WebhookBodies, storescu, successes
from tests.sinks_peers import HTTPReceiver

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed"),
]


@pytest.fixture
def world(daemon: Daemon) -> Iterator[tuple[Daemon, WebhookBodies]]:
    bodies = WebhookBodies()
    with HTTPReceiver(bodies.answer) as receiver:
        daemon.env.update(
            {
                "PACS_EMBED_STUDY__STABLE_SECONDS": "1",
                "PACS_EMBED_SINKS__WEBHOOK__URL": receiver.url,
                "PACS_EMBED_SINKS__WEBHOOK__SECRET": "s",
                "PACS_EMBED_SINKS__WEBHOOK__INCLUDE_VECTORS": "true",
            }
        )
        yield daemon, bodies


def send(daemon: Daemon, path: Path) -> None:
    sent = storescu(daemon.dicom_port, [path])
    assert successes(sent) == 1, sent.stdout + sent.stderr


def events(daemon: Daemon, name: str) -> int:
    return sum(1 for line in daemon.log_lines() if line.get("event") == name)


def send_version_one(
    daemon: Daemon, bodies: WebhookBodies, tmp_path: Path
) -> tuple[str, str, Dataset, Dataset, Path]:
    """A two-slice study sent and delivered as version 1: (study, series, first, other, first's
    file)."""
    study, series = factory.new_uid(), factory.new_uid()
    first = factory.ct_slice(study_uid=study, series_uid=series, instance_number=1, rows=32)
    other = factory.ct_slice(study_uid=study, series_uid=series, instance_number=2, rows=32)
    a, b = factory.write(first, tmp_path / "a.dcm"), factory.write(other, tmp_path / "b.dcm")
    send(daemon, a)
    send(daemon, b)
    daemon.wait_for(lambda: bodies.versions() == [1], 60, "version 1's webhook")
    return study, series, first, other, a


def test_identical_resend_is_a_no_op_and_a_correction_opens_a_new_version(
    world: tuple[Daemon, WebhookBodies], tmp_path: Path
) -> None:
    daemon, bodies = world
    daemon.start()
    study, series, first, other, a = send_version_one(daemon, bodies, tmp_path)

    send(daemon, a)  # the same bytes again: acknowledged, nothing redone
    daemon.wait_for(lambda: events(daemon, "store.duplicate") == 1, 10, "the resend seen")

    corrected = factory.ct_slice(
        study_uid=study, series_uid=series, instance_number=1, rows=32, seed=99
    )
    corrected.SOPInstanceUID = first.SOPInstanceUID
    send(daemon, factory.write(corrected, tmp_path / "a2.dcm"))
    daemon.wait_for(lambda: bodies.versions() == [1, 2], 60, "version 2's webhook")

    sop, kept = str(first.SOPInstanceUID), str(other.SOPInstanceUID)
    assert not np.allclose(bodies.vector(1, sop), bodies.vector(2, sop))  # embedded again
    assert np.allclose(bodies.vector(1, kept), bodies.vector(2, kept))
    assert events(daemon, "store.correction") == 1
    status = daemon.status()
    assert status["instances"]["embedded"] == 2 and status["instances"]["received"] == 2
    assert status["counters"]["embedded"] == 3  # the correction was embedded once more


def test_after_retention_an_identical_resend_is_still_a_no_op(
    world: tuple[Daemon, WebhookBodies], tmp_path: Path
) -> None:
    daemon, bodies = world
    daemon.env["PACS_EMBED_SPOOL__RETENTION_HOURS"] = "0.0001"  # 0.36 s after delivery
    daemon.start()
    spool = Spool(daemon.state_dir / "spool", daemon.state_dir / "quarantine")
    study, series, first, other, a = send_version_one(daemon, bodies, tmp_path)
    uids = [str(first.SOPInstanceUID), str(other.SOPInstanceUID)]
    daemon.wait_for(
        lambda: not any(spool.contains(uid) for uid in uids), 30, "retention deleting both files"
    )

    send(daemon, a)  # identical, but its first copy is gone: the ledger's digest knows it
    daemon.wait_for(lambda: events(daemon, "store.resend_identical") == 1, 20, "the resend seen")
    assert not spool.contains(uids[0])  # the duplicate copy is not kept either

    corrected = factory.ct_slice(
        study_uid=study, series_uid=series, instance_number=2, rows=32, seed=7
    )
    corrected.SOPInstanceUID = other.SOPInstanceUID
    send(daemon, factory.write(corrected, tmp_path / "b2.dcm"))
    daemon.wait_for(lambda: bodies.versions() == [1, 2], 60, "version 2's webhook only")
    assert {i["sop_instance_uid"] for i in bodies.got[1]["images"]} == set(uids)
