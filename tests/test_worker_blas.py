"""A worker process gets one BLAS thread before numpy loads (workers/blas.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.blas import BLAS_THREAD_VARIABLES, is_worker_command, single_threaded

ROOT = Path(__file__).resolve().parent.parent

#: What a fresh interpreter reports after importing the package as both entries do.
PROBE = (
    "import sys; sys.argv = ['pacs-embed', *sys.argv[1:]]; import pacs_embed, os; "
    "print('numpy' in sys.modules, *(os.environ.get(v) for v in {names!r}))"
)


@pytest.mark.parametrize(
    ("argv", "worker"),
    [
        (["pacs-embed", "worker"], True),
        (["pacs-embed", "--config", "site.toml", "worker", "--burst"], True),
        (["pacs-embed", "listen"], False),
        (["pacs-embed", "--config", "worker", "listen"], False),
        (["pacs-embed"], False),
    ],
)
def test_the_worker_command_is_recognised(argv: list[str], worker: bool) -> None:
    """Only the `worker` subcommand counts, not a config file that happens to be named so."""
    assert is_worker_command(argv) is worker


def probe(*args: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARIABLES}
    code = PROBE.format(names=BLAS_THREAD_VARIABLES)
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_a_worker_process_has_one_blas_thread_before_numpy_loads() -> None:
    """Importing the package for `worker` sets every BLAS variable to 1, numpy not yet loaded;
    other commands are left alone."""
    assert probe("worker") == ["False", "1", "1", "1"]
    assert probe("listen") == ["False", "None", "None", "None"]


def test_an_operators_setting_wins() -> None:
    """A thread count set in the environment is kept."""
    assert probe("worker", OPENBLAS_NUM_THREADS="4") == ["False", "4", "1", "1"]
    environ = {"MKL_NUM_THREADS": "2"}
    single_threaded(environ)
    assert environ == {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "2"}
