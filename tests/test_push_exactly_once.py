"""Exactly once per sink and version, at the worst moment: the push process is killed (-9) after
the sink took the results and before the delivery was recorded.

Each receiver here kills `pacs-embed push` the first time it receives something, before it
answers. `run` restarts the push service and hands the interrupted job back to the queue; the
redo sends the same SR (same SOP Instance UID, so a PACS keeps one copy) and the same webhook
idempotency key (so a receiver drops the repeat). Recorded deliveries: one per sink.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from pipeline.sinks.webhook import IDEMPOTENCY_HEADER
from tests import factory
from tests.daemon import Daemon, children, role, storescu, successes
from tests.sinks_peers import COMPREHENSIVE_SR, HTTPReceiver, Recorded, StoreSCP

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed"),
]

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


class Killer:
    """Kills the daemon's push process, once."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.killed = threading.Event()

    def once(self) -> None:
        if self.killed.is_set():
            return
        (pid,) = [p for p in children(self.daemon, b"pacs_embed") if role(p) == "push"]
        self.killed.set()
        os.kill(pid, signal.SIGKILL)


class KillingSCP(StoreSCP):
    """Stores, then kills the pusher before answering its first C-STORE."""

    killer: Killer

    def _on_store(self, event: Any) -> int:
        self.received.append(event.dataset)
        self.killer.once()
        return 0x0000


def test_a_push_killed_after_the_send_is_delivered_once_per_sink(
    daemon: Daemon, tmp_path: Path
) -> None:
    webhook_keys: list[str] = []
    web_killer = Killer(daemon)

    def answer(request: Recorded) -> tuple[int, dict[str, str], bytes]:
        headers = {k.lower(): v for k, v in request.headers.items()}
        webhook_keys.append(headers[IDEMPOTENCY_HEADER.lower()])
        web_killer.once()
        return 204, {}, b""

    scp = KillingSCP(sop_classes=(COMPREHENSIVE_SR, KOS))
    scp.killer = Killer(daemon)
    with scp, HTTPReceiver(answer) as receiver:
        daemon.env.update(
            {
                "PACS_EMBED_STUDY__STABLE_SECONDS": "1",
                "PACS_EMBED_SINKS__DICOM__HOST": "127.0.0.1",
                "PACS_EMBED_SINKS__DICOM__PORT": str(scp.port),
                "PACS_EMBED_SINKS__DICOM__AE_TITLE": scp.ae_title,
                "PACS_EMBED_SINKS__WEBHOOK__URL": receiver.url,
                "PACS_EMBED_SINKS__WEBHOOK__SECRET": "s",
            }
        )
        daemon.start()
        study, series = factory.new_uid(), factory.new_uid()
        files = [
            factory.write(
                factory.ct_slice(study_uid=study, series_uid=series, instance_number=i, rows=32),
                tmp_path / f"{i}.dcm",
            )
            for i in range(1, 4)
        ]
        sent = storescu(daemon.dicom_port, files)
        assert successes(sent) == 3, sent.stdout + sent.stderr

        def delivered() -> bool:
            recent = daemon.status()["studies"]["recent"]
            return bool(recent) and recent[0]["pushed"] == {"dicom": 1, "webhook": 1}

        daemon.wait_for(delivered, 90, "both deliveries recorded")
    assert scp.killer.killed.is_set() and web_killer.killed.is_set()
    sr_uids = [str(ds.SOPInstanceUID) for ds in scp.received if ds.SOPClassUID == COMPREHENSIVE_SR]
    assert len(sr_uids) == 2 and len(set(sr_uids)) == 1  # sent twice, one instance
    assert len(webhook_keys) == 2 and len(set(webhook_keys)) == 1
    sinks = daemon.status()["sinks"]
    assert sinks["pushes"] == {"dicom": {"sent": 1}, "webhook": {"sent": 1}}
    assert sinks["dead_lettered"] == 0
    exits = [e for e in daemon.log_lines() if e.get("event") == "child.exited"]
    assert [e["role"] for e in exits] == ["push", "push"]
