"""Ledger transitions that a crash makes happen twice must not take a finished instance back."""

from __future__ import annotations

import redis

from pipeline.ledger import Ledger, Stage


def test_a_redone_conversion_leaves_embedded_and_skipped_instances_final(
    redis_conn: redis.Redis,
) -> None:
    """Reconciliation or the sweeper may convert an instance again just as its first job
    finishes: converting/converted must then leave it embedded (or skipped), or its second
    completion would count it twice. A failed instance, resent, does move on."""
    ledger = Ledger(redis_conn)
    done, skipped, failed = "1.2.1", "1.2.2", "1.2.3"
    ledger.spooled([done, skipped, failed])
    with redis_conn.pipeline() as pipe:
        ledger.mark_embedded(pipe, [done])
        pipe.execute()
    ledger.skipped(skipped, "not an image")
    ledger.failed(failed, Stage.CONVERT, "unreadable")

    ledger.converting([done, skipped, failed])
    for uid in (done, skipped, failed):
        ledger.converted(uid, {"modality": "CT"}, [0])

    counts = ledger.counts()
    assert (counts["embedded"], counts["skipped"], counts["failed"]) == (1, 1, 0)
    assert counts["queued"] == 1 and counts["received"] == 3  # the failed one, moving again
    assert ledger.counters()["embedded"] == 1
