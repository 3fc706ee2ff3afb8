"""The chaos proof, CI-sized: kill -9 during ingest, endpoint faults, overload on a tiny spool.

Each scenario runs the real `pacs-embed run` (private Redis, emulator, listener, admin, workers)
on loopback, drives it with pynetdicom and DCMTK senders that resend like a PACS, and holds the
final state against what the senders were told (tests/chaos.py). Full-size runs: bench/chaos.py.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from emulator import EmulatorServer, EmulatorSettings
from tests import chaos

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed"),
    # pynetdicom 3.0 leaves its socket unclosed when a connection is refused (transport.py,
    # connect()): the sender's retries while the listener restarts are exactly that.
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
    ),
]

#: The listener's own resident memory must stay under this while 8 associations send at once.
MAX_LISTENER_RSS_MB = 400


def report(result: chaos.Result) -> None:
    """Print the scenario's one line; fail with every broken promise and the lost instances'
    stories."""
    print(f"\n{result.line()}")
    problems = result.problems()
    assert not problems, "\n".join([*problems, *result.stories])


def test_role_of_reads_the_command_line() -> None:
    """Roles come from command lines: the subcommand after the module, or redis's title."""
    python = "/work/.venv/bin/python"
    assert chaos.role_of([python, "-m", "pacs_embed", "worker"]) == "worker"
    assert chaos.role_of([python, "-m", "pacs_embed", "--config", "c.toml", "listen"]) == "listen"
    assert chaos.role_of(["/usr/bin/redis-server unixsocket:/x/redis.sock"]) == "redis"
    assert chaos.role_of([python, "-B", "-c", "from multiprocessing.spawn import x"]) is None


def _post(url: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """POST on loopback: status, headers, body (an HTTP error is an answer too)."""
    request = urllib.request.Request(url, data=body)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_emulator_outage_answers_503_then_recovers() -> None:
    """POST /outage makes /score answer 503 without Retry-After until it is over."""
    with EmulatorServer(EmulatorSettings(), port=0) as server:
        base = server.url.removesuffix("/score")
        score = json.dumps({"input_data": {"columns": ["image", "text"], "data": [["", "x"]]}})
        assert _post(server.url, score.encode())[0] == 200
        status, _, body = _post(f"{base}/outage", b'{"seconds": 30}')
        assert (status, json.loads(body)) == (200, {"outage_seconds": 30.0})
        status, headers, _ = _post(server.url, score.encode())
        assert status == 503 and "Retry-After" not in headers
        assert _post(f"{base}/outage", b'{"seconds": 0}')[0] == 200
        assert _post(server.url, score.encode())[0] == 200
        assert server.stats.snapshot()["injected"] == {"outage": 1}


def test_crash_loses_nothing_and_embeds_once(tmp_path: Path) -> None:
    """200 instances, kill -9 of the listener, its dispatcher, a worker and Redis (4 kills, one
    each): all embedded once."""
    result = chaos.crash(
        tmp_path,
        instances=200,
        studies=4,
        kills=4,
        gaps=(1.5, 2.5),
        send_seconds=8.0,
        timeout=120.0,
    )
    report(result)
    assert result.recovered_in_s is not None and result.recovered_in_s <= 60.0


def test_endpoint_faults_end_fully_embedded(tmp_path: Path) -> None:
    """30 % 429/503, 5 % hangs, a cold start and a 10 s outage: 100 % embedded, no manual step."""
    result = chaos.faults(
        tmp_path,
        instances=200,
        studies=4,
        outage_seconds=10.0,
        cold_start_seconds=10.0,
        timeout=150.0,
    )
    report(result)
    assert result.verdict.embedded == 200


@pytest.mark.skipif(not chaos.can_mount(), reason="a tmpfs spool needs root (CI runs as root)")
def test_overload_on_a_tiny_spool(tmp_path: Path) -> None:
    """8 associations at once on a 32 MB tmpfs spool: 0xA700 under the watermark, none after the
    space frees, no partial file, all embedded once, the listener's memory bounded."""
    result = chaos.overload(
        tmp_path, associations=8, per_association=25, spool_mb=32, watermark_mb=8, room_mb=2.0
    )
    report(result)
    assert result.facts["a7xx_before_free"] > 0
    assert result.facts["a7xx_after_free"] == 0
    assert result.facts["refused"] == f"free_disk_under_the_watermark:{result.facts['a7xx']}"
    assert result.facts["listener_rss_peak_mb"] < MAX_LISTENER_RSS_MB


@pytest.mark.skipif(chaos.can_mount(), reason="as root, the tiny-spool variant runs instead")
def test_overload_without_a_tiny_spool(tmp_path: Path) -> None:
    """8 associations at once (no tmpfs without root): all embedded once, memory bounded."""
    result = chaos.overload(tmp_path, associations=8, per_association=25, spool_mb=None)
    report(result)
    assert result.facts["listener_rss_peak_mb"] < MAX_LISTENER_RSS_MB
