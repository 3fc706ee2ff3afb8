"""`pacs-embed reference import|export|list` against a real Redis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from pacs_embed import cli
from pipeline.detect.detector import reference_store
from pipeline.settings import Settings


@pytest.fixture(autouse=True)
def _env(redis_server: str, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_EMBED_REDIS__URL", redis_server)
    monkeypatch.setenv("PACS_EMBED_DETECT__MAX_REFERENCE", "150")
    # cli.main configures structlog globally onto pytest's captured stderr; not under test here.
    monkeypatch.setattr(cli.logs, "configure", lambda *_args: None)


def vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = np.zeros(1024)
    centre[0] = 1.0
    return centre + 0.5 * rng.standard_normal((n, 1024)) / 32


def test_import_export_round_trip(
    tmp_path: Path, redis_conn: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """Imported vectors are exported unchanged (normalised), with cohort, UIDs and LOO scores."""
    source = vectors(120)
    uids = np.array([f"1.2.{i}" for i in range(120)])
    np.savez(tmp_path / "in.npz", vectors=source, cohort="cr/Thorax", sop_instance_uids=uids)
    assert cli.main(["reference", "import", str(tmp_path / "in.npz")]) == 0
    assert "CR/CHEST: 120 vectors, scored" in capsys.readouterr().out
    assert cli.main(["reference", "list"]) == 0
    assert capsys.readouterr().out.startswith("CR/CHEST\t120\tscored")
    assert cli.main(["reference", "export", "--out", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as data:
        unit = source / np.linalg.norm(source, axis=1, keepdims=True)
        np.testing.assert_allclose(data["vectors"], unit, atol=1e-6)
        assert set(data["cohort"]) == {"CR/CHEST"} and list(data["sop_instance_uids"]) == list(uids)
        assert data["loo_score"].shape == (120,) and np.isfinite(data["loo_score"]).all()
    assert cli.main(["reference", "import", str(tmp_path / "out.npz")]) == 0  # re-importable


def test_import_leaves_out_flagged_rows_and_caps_size(
    tmp_path: Path, redis_conn: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """An embeddings export imports without its flagged rows, subsampled to max_reference."""
    outlier = np.zeros(200, bool)
    outlier[:10] = True
    np.savez(
        tmp_path / "e.npz",
        vectors=vectors(200),
        cohort=np.array(["CT/CHEST"] * 200),
        outlier=outlier,
    )
    assert cli.main(["reference", "import", str(tmp_path / "e.npz")]) == 0
    out = capsys.readouterr().out
    assert "10 flagged rows left out" in out and "40 over max_reference left out" in out
    refs = reference_store(Settings.load().detect, redis_conn)  # max_reference 150, from _env
    assert refs.snapshot("CT/CHEST").size == 150


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"vectors": np.ones((3, 1024))}, "no 'cohort' array"),
        ({"cohort": "CR/CHEST"}, "no 'vectors' array"),
        ({"vectors": np.ones((3, 1024)), "cohort": "CR"}, "modality/body_part"),
        ({"vectors": np.ones((3, 16)), "cohort": "CR/CHEST"}, "16-d"),
    ],
)
def test_bad_import_files_exit_2_with_the_reason(
    tmp_path: Path, arrays: dict[str, object], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that cannot be a reference is refused with a message saying why."""
    np.savez(tmp_path / "bad.npz", **arrays)  # type: ignore[arg-type]
    assert cli.main(["reference", "import", str(tmp_path / "bad.npz")]) == 2
    assert message in capsys.readouterr().err


def test_parquet_is_refused_without_pyarrow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Parquet is not read (pyarrow is not a dependency); the message says to use .npz."""
    (tmp_path / "r.parquet").write_bytes(b"PAR1")
    assert cli.main(["reference", "import", str(tmp_path / "r.parquet")]) == 2
    assert ".npz" in capsys.readouterr().err
