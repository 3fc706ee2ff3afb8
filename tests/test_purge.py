"""`pacs-embed purge [--older-than-days N]`: quarantined instances (copy and note) older than N
days go; younger ones, and the spool, stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis

from dicom_listener.spool import Spool
from pacs_embed import cli
from pipeline import logs
from pipeline.settings import Settings

DAY = 86400.0


@pytest.fixture
def spool(
    redis_server: str, redis_conn: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Spool:
    """The spool of the state dir `pacs-embed` is pointed at."""
    monkeypatch.setenv("PACS_EMBED_REDIS__URL", redis_server)
    monkeypatch.setenv("PACS_EMBED_STATE_DIR", str(tmp_path / "var"))
    # cli.main configures structlog globally onto pytest's captured stderr; not under test here.
    monkeypatch.setattr(logs, "configure", lambda *_args: None)
    settings = Settings.load(None)
    return Spool(settings.spool_dir, settings.quarantine_dir)


def quarantined(spool: Spool, uid: str, days_ago: float) -> tuple[Path, Path]:
    """An instance quarantined ``days_ago`` days ago: its copy and its note."""
    source = spool.path_for(uid)
    source.write_bytes(b"DICM")
    copy = spool.quarantine(uid, source, "no decoder could read the pixels")
    note = copy.with_suffix(".json")
    then = time.time() - days_ago * DAY
    for path in (copy, note):
        os.utime(path, (then, then))
    return copy, note


def test_purge_deletes_only_quarantined_files_older_than_n_days(
    spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    old = quarantined(spool, "1.2.3.1", days_ago=10)
    older = quarantined(spool, "1.2.3.2", days_ago=30)
    young = quarantined(spool, "1.2.3.3", days_ago=3)
    spooled = spool.path_for("1.2.3.4")
    spooled.write_bytes(b"DICM")
    os.utime(spooled, (time.time() - 100 * DAY,) * 2)  # old, but the spool's, not quarantine's

    assert cli.main(["purge", "--older-than-days", "7"]) == 0
    assert capsys.readouterr().out.strip() == "purged 2 quarantined instances"
    assert not any(path.exists() for path in (*old, *older))
    assert all(path.exists() for path in young)
    assert spooled.exists()
    assert spool.quarantined() == 1


def test_purge_without_age_deletes_every_quarantined_file(
    spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [*quarantined(spool, "1.2.3.1", days_ago=0), *quarantined(spool, "1.2.3.2", 1)]
    assert cli.main(["purge"]) == 0
    assert capsys.readouterr().out.strip() == "purged 2 quarantined instances"
    assert not any(path.exists() for path in files)
    assert cli.main(["purge"]) == 0
    assert capsys.readouterr().out.strip() == "purged 0 quarantined instances"


def test_purge_goes_by_the_quarantine_time_not_the_file_time(
    spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    """The note's time is when it was quarantined: an instance received long ago but
    quarantined today stays; a copy whose note is gone goes by its own time."""
    copy, note = quarantined(spool, "1.2.3.1", days_ago=0)
    os.utime(copy, (time.time() - 50 * DAY,) * 2)
    lone, lone_note = quarantined(spool, "1.2.3.2", days_ago=20)
    lone_note.unlink()
    assert cli.main(["purge", "--older-than-days", "7"]) == 0
    assert capsys.readouterr().out.strip() == "purged 1 quarantined instances"
    assert copy.exists() and note.exists()
    assert not lone.exists()
