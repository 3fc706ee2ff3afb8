"""`pacs-embed run` supervises its workers: one killed is replaced, and work goes on."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests import factory
from tests.daemon import Daemon, argv, children, storescu, successes

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed"),
]


def workers(daemon: Daemon) -> set[int]:
    """PIDs of `run`'s live `pacs-embed worker` children."""
    return {pid for pid in children(daemon) if b"worker" in argv(pid)}


def test_a_killed_worker_is_replaced_and_work_goes_on(daemon: Daemon, tmp_path: Path) -> None:
    """kill -9 of one embed worker: `run` starts another, and a study sent after is embedded."""
    daemon.start()
    daemon.wait_for(lambda: len(workers(daemon)) == 2, 30, "two workers")
    before = workers(daemon)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        """Two workers again, the victim not among them: one was started in its place."""
        now = workers(daemon)
        return len(now) == 2 and victim not in now

    daemon.wait_for(replaced, 30, "a new worker in place of the killed one")
    ds = factory.ct_slice(study_uid="1.2.7", series_uid="1.2.7.1", instance_number=1, rows=32)
    sent = storescu(daemon.dicom_port, [factory.write(ds, tmp_path / "ct.dcm")])
    assert successes(sent) == 1, sent.stdout + sent.stderr
    daemon.wait_embedded(1, timeout=60)
    assert any(
        line.get("event") == "child.exited" and line.get("role", "").startswith("worker")
        for line in daemon.log_lines()
    )
    daemon.wait_for(replaced, 30, "two workers still")
