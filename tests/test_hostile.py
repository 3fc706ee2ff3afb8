"""Hostile input against a running `pacs-embed run`: malformed objects, unsafe UIDs, a deflate
bomb, wrong AE titles, a race on one SOP Instance UID (objects from tests/hostile.py).

One daemon, one campaign (module fixture): the whole batch over a few associations, the wrong
called AE titles, the bomb with the daemon's RSS sampled from /proc, twelve simultaneous sends,
then a normal image. The tests below each check one property of what happened; the last one
stops the daemon and reads its log.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pipeline import keys
from tests import hostile
from tests.daemon import Daemon, descendants
from tests.hostile import (
    ANY_FINAL,
    CANNOT_UNDERSTAND,
    SUCCESS,
    Case,
    Outcome,
    final_states,
)

RSS_LIMIT_BYTES = 600 * 1024 * 1024
SETTLE_TIMEOUT = 45.0
INSTANCE_STATES = {"received", "spooled", "converting", "queued", "embedded", "skipped", "failed"}
IN_FLIGHT = ("spooled", "converting", "queued")


# -- the campaign -------------------------------------------------------------------------------
@dataclass
class RssSampler:
    """Peak RSS of `run` and each of its descendants, sampled from /proc every 50 ms."""

    root: int
    peaks: dict[int, tuple[str, int]] = field(default_factory=dict)
    family_peak: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(5)
        for pid in [self.root, *descendants(self.root)]:  # the kernel's own peak, where alive
            hwm = rss_bytes(pid, "VmHWM")
            if hwm is not None and hwm > self.peaks.get(pid, ("", 0))[1]:
                self.peaks[pid] = (f"{process_name(pid)} (VmHWM)", hwm)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in [self.root, *descendants(self.root)]:
                rss = rss_bytes(pid)
                if rss is None:
                    continue
                total += rss
                if rss > self.peaks.get(pid, ("", 0))[1]:
                    self.peaks[pid] = (process_name(pid), rss)
            self.family_peak = max(self.family_peak, total)
            self.samples += 1
            self._stop.wait(0.05)

    def report(self) -> str:
        rows = sorted(self.peaks.items(), key=lambda item: -item[1][1])
        lines = [f"  {pid} {name}: {rss / 2**20:.0f} MB" for pid, (name, rss) in rows]
        return "\n".join(
            [f"{self.samples} samples, family peak {self.family_peak / 2**20:.0f} MB", *lines]
        )


def rss_bytes(pid: int, field_name: str = "VmRSS") -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def process_name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)[-60:]


@dataclass
class Campaign:
    daemon: Daemon
    root: Path
    redis_url: str
    files_before: set[Path]
    outcomes: list[Outcome]
    called_aets: dict[str, str]
    bomb: Outcome
    bomb_seconds: float
    rss: RssSampler
    run_hwm: int | None
    simultaneous_case: Case
    simultaneous: list[int | None]
    after: Outcome
    settled: bool
    last_status: dict[str, Any]
    connection: redis.Redis = field(repr=False)
    exit_code: int | None = None

    def acked(self) -> list[Outcome]:
        everything = [*self.outcomes, self.bomb, self.after]
        return [outcome for outcome in everything if outcome.status == SUCCESS]

    def by_group(self, group: str) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.case.group == group]

    def summary(self) -> str:
        """Statuses per group, and the rest of what happened: printed for whoever reads -rA."""
        lines = []
        for group in GROUPS:
            counts = Counter(o.describe().rsplit(": ", 1)[-1] for o in self.by_group(group))
            lines.append(f"{group}: {dict(counts)}")
        lines += [
            f"called AE titles: {self.called_aets}",
            f"bomb: {self.bomb.describe()} in {self.bomb_seconds:.1f} s",
            f"RSS: {self.rss.report()}",
            f"run VmHWM: {(self.run_hwm or 0) / 2**20:.0f} MB",
            f"simultaneous: {[None if s is None else hex(s) for s in self.simultaneous]}",
            f"after: {self.after.describe()}",
            f"settled: {self.settled}",
        ]
        return "\n".join(lines)


def files_outside(root: Path, state_dir: Path, log: Path) -> set[Path]:
    return {
        path
        for path in root.rglob("*")
        if path != log and state_dir not in path.parents and path != state_dir
    }


def failure_reason(connection: redis.Redis, uid: str) -> str:
    raw = connection.hget(keys.FAILED, uid)
    if raw is None:
        return ""
    try:
        return str(json.loads(raw).get("reason", ""))
    except ValueError:
        return raw.decode(errors="replace")


def settle(daemon: Daemon, connection: redis.Redis, uids: list[str]) -> tuple[bool, dict[str, Any]]:
    """Wait (bounded) until every acknowledged UID is final and nothing is in flight."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if daemon.proc is not None and daemon.proc.poll() is not None:
            return False, status
        try:
            status = daemon.status()
        except AssertionError:
            status = {}
        instances = status.get("instances", {})
        idle = all(instances.get(state, 0) == 0 for state in IN_FLIGHT)
        if idle and all(state is not None for state in final_states(connection, uids).values()):
            return True, status
        time.sleep(0.3)
    return False, status


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    root = tmp_path_factory.mktemp("hostile")
    (root / "tmp").mkdir()  # the daemon's TMPDIR: anything written there is outside state_dir
    state_dir, log = root / "var", root / "daemon.log"
    daemon = Daemon(state_dir, log, QUEUE__LINGER_SECONDS="0.3")
    daemon.env["TMPDIR"] = str(root / "tmp")
    files_before = files_outside(root, state_dir, log)
    daemon.start()
    try:
        done = run_campaign(daemon, root, files_before)
        print(done.summary())
        yield done
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


def run_campaign(daemon: Daemon, root: Path, files_before: set[Path]) -> Campaign:
    assert daemon.proc is not None
    redis_url = (daemon.state_dir / "redis" / "url").read_text().strip()
    connection = redis.Redis.from_url(redis_url)
    port = daemon.dicom_port
    with hostile.lenient_pynetdicom():
        outcomes = hostile.send(port, hostile.batch())
        called = {
            name: hostile.associate_raw(port, aet) for name, aet in hostile.BAD_CALLED_AETS.items()
        }

        bomb_case = hostile.deflate_bomb()
        started = time.monotonic()
        with RssSampler(daemon.proc.pid) as rss:
            [bomb] = hostile.send(port, [bomb_case], timeout=120.0)
            if bomb.status == SUCCESS:  # and while the pipeline deals with it
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if final_states(connection, [bomb_case.sop_instance_uid])[
                        bomb_case.sop_instance_uid
                    ]:
                        break
                    time.sleep(0.2)
        bomb_seconds = time.monotonic() - started
        run_hwm = rss_bytes(daemon.proc.pid, "VmHWM")

        same = hostile.simultaneous()
        simultaneous = hostile.send_simultaneously(port, same)
        [after] = hostile.send(port, [hostile.control("control/after")])

    acked = [o.case.ledger_uid for o in [*outcomes, bomb, after] if o.status == SUCCESS]
    if SUCCESS in simultaneous:
        acked.append(same.sop_instance_uid)
    settled, status = settle(daemon, connection, acked)
    return Campaign(
        daemon=daemon,
        root=root,
        redis_url=redis_url,
        files_before=files_before,
        outcomes=outcomes,
        called_aets=called,
        bomb=bomb,
        bomb_seconds=bomb_seconds,
        rss=rss,
        run_hwm=run_hwm,
        simultaneous_case=same,
        simultaneous=simultaneous,
        after=after,
        settled=settled,
        last_status=status,
        connection=connection,
    )


def describe(outcomes: list[Outcome]) -> str:
    return "\n".join("  " + outcome.describe() for outcome in outcomes)


# -- the generator itself (no daemon) -----------------------------------------------------------
def test_generator_is_deterministic_and_carries_phi() -> None:
    """Same bytes every time; every case unique by SOP UID; every whole object has the patient."""
    first, second = hostile.batch(), hostile.batch()
    assert [(c.name, c.sop_instance_uid, c.data) for c in first] == [
        (c.name, c.sop_instance_uid, c.data) for c in second
    ]
    assert len({c.sop_instance_uid for c in first}) == len(first)
    counts = Counter(c.group for c in first)
    assert counts["truncated"] >= 150 and counts["command-uid"] >= 15, counts
    assert len(first) + 1 + 12 + 1 + len(hostile.BAD_CALLED_AETS) >= 250
    for case in first:
        if case.group in {"control", "nonconformant-uid", "pixel-length", "frames"}:
            data = case.data
            if case.transfer_syntax == DeflatedExplicitVRLittleEndian:
                data = zlib.decompress(data, -zlib.MAX_WBITS)
            for value in hostile.PHI:
                assert value.encode() in data, (case.name, value)
        if re.fullmatch(r"2\.25\.\d+", case.sop_instance_uid):  # ours, not a crafted one
            assert not hostile.find_phi(case.sop_instance_uid)
    assert hostile.find_phi(f"x={hostile.PATIENT_ID}") and hostile.find_phi("id 4711,")
    assert not hostile.find_phi("t=1712345678.08153 uid=2.25.1147112")


def test_deflate_bomb_inflates_past_two_gib_from_two_mb() -> None:
    case = hostile.deflate_bomb()
    assert len(case.data) < 3 * 2**20
    inflater, inflated, data = zlib.decompressobj(-zlib.MAX_WBITS), 0, case.data
    while data:
        inflated += len(inflater.decompress(data, 64 << 20))
        data = inflater.unconsumed_tail
    assert inflater.eof and inflated > hostile.BOMB_INFLATED_BYTES


# -- what the daemon did ------------------------------------------------------------------------
@pytest.mark.e2e
def test_survives_and_embeds_a_normal_image_afterwards(campaign: Campaign) -> None:
    """After everything hostile, the daemon is up and a normal image goes all the way."""
    daemon = campaign.daemon
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_tail()
    assert campaign.after.status == SUCCESS, campaign.after.describe()
    state = final_states(campaign.connection, [campaign.after.case.sop_instance_uid])
    assert state[campaign.after.case.sop_instance_uid] == "embedded", daemon.log_tail()
    assert campaign.settled, (
        f"pipeline did not settle in {SETTLE_TIMEOUT} s: {campaign.last_status}"
    )


GROUPS = [
    "control",
    "truncated",
    "length",
    "dimensions",
    "pixel-length",
    "frames",
    "transfer-syntax",
    "command-uid",
    "nonconformant-uid",
    "dataset-uid",
]


@pytest.mark.e2e
@pytest.mark.parametrize("group", GROUPS)
def test_statuses(campaign: Campaign, group: str) -> None:
    """Unsafe command UIDs and unparseable data sets 0xC000, class mismatch 0xA900, safe
    non-conformant UIDs 0x0000; no abort or silence but pynetdicom's own (see hostile.py)."""
    outcomes = campaign.by_group(group)
    assert outcomes
    wrong = [o for o in outcomes if o.status not in o.case.statuses or o.note]
    expected = {o.case.name: sorted(f"0x{s & 0xFFFF:04X}" for s in o.case.statuses) for o in wrong}
    assert not wrong, (
        f"{len(wrong)}/{len(outcomes)} answered wrongly:\n{describe(wrong)}\n{expected}"
    )


@pytest.mark.e2e
@pytest.mark.parametrize("group", GROUPS)
def test_acknowledged_objects_reach_their_final_state(campaign: Campaign, group: str) -> None:
    """Everything taken ends embedded, skipped or failed (with a reason) as its case says."""
    acked = [o for o in campaign.by_group(group) if o.status == SUCCESS]
    if not acked:
        pytest.skip(f"nothing in {group} was acknowledged")
    states = final_states(campaign.connection, [o.case.ledger_uid for o in acked])
    wrong = []
    for outcome in acked:
        uid = outcome.case.ledger_uid
        state = states[uid]
        reason = failure_reason(campaign.connection, uid) if state == "failed" else ""
        # a case that had to be refused is test_statuses' finding; here: did it end at all
        finals = ANY_FINAL if outcome.case.must_refuse else outcome.case.finals
        if state not in finals or (state == "failed" and not reason):
            wrong.append(f"  {outcome.case.name}: {state} {reason!r}")
    assert not wrong, f"{len(wrong)}/{len(acked)} ended wrongly:\n" + "\n".join(wrong)


@pytest.mark.e2e
def test_wrong_called_ae_titles_are_rejected(campaign: Campaign) -> None:
    """A-ASSOCIATE-RJ for an association addressed to another AE title; an A-ABORT (PDU type
    0x07, PS3.8's answer to an invalid PDU) for a title that is not an AE title at all."""
    wrong = {
        name: got
        for name, got in campaign.called_aets.items()
        if not got.startswith("rej") and got != "PDU type 0x07"
    }
    assert not wrong, wrong


@pytest.mark.e2e
def test_twelve_simultaneous_sends_embed_once(campaign: Campaign) -> None:
    """Same SOP Instance UID over twelve associations at once: all 0x0000, embedded once."""
    case = campaign.simultaneous_case
    assert campaign.simultaneous == [SUCCESS] * 12, campaign.simultaneous
    uid = case.sop_instance_uid
    assert final_states(campaign.connection, [uid])[uid] == "embedded"
    series = hostile.uid("simultaneous/series")
    counted = campaign.connection.hget(keys.series_key(series), "count")
    assert counted is not None and int(counted) == 1, f"series count {counted!r}"
    enqueued = sum(
        line.get("images", 0)
        for line in campaign.daemon.log_lines()
        if line.get("event") == "batch.enqueued" and line.get("series_instance_uid") == series
    )
    assert enqueued == 1, f"the instance went to the endpoint {enqueued} times"


@pytest.mark.e2e
def test_deflate_bomb_is_refused_or_failed_with_bounded_memory(campaign: Campaign) -> None:
    """2 GiB of inflated zeros must not be inflated: RSS of every process stays under 600 MB."""
    bomb = campaign.bomb
    assert bomb.status in {SUCCESS, CANNOT_UNDERSTAND}, bomb.describe()
    if bomb.status == SUCCESS:
        uid = bomb.case.sop_instance_uid
        assert final_states(campaign.connection, [uid])[uid] == "failed"
        assert failure_reason(campaign.connection, uid)
    report = f"{campaign.rss.report()}\nrun VmHWM {(campaign.run_hwm or 0) / 2**20:.0f} MB"
    peak = max(rss for _, rss in campaign.rss.peaks.values())
    assert peak < RSS_LIMIT_BYTES, report
    assert campaign.run_hwm is not None and campaign.run_hwm < RSS_LIMIT_BYTES, report


@pytest.mark.e2e
def test_status_instances_add_up(campaign: Campaign) -> None:
    """/status instances: the seven states, received == the sum of the others."""
    instances = campaign.daemon.status()["instances"]
    assert set(instances) == INSTANCE_STATES, instances
    others = sum(instances[state] for state in INSTANCE_STATES - {"received"})
    assert instances["received"] == others, instances
    assert instances["received"] == len(campaign.acked()) + 1  # + the simultaneous one


@pytest.mark.e2e
def test_status_lists_failures_with_reasons(campaign: Campaign) -> None:
    failures = campaign.daemon.status()["failures"]
    assert failures, "hostile objects were acknowledged and failed, /status lists none"
    for failure in failures:
        assert set(failure) == {"sop_instance_uid", "stage", "reason", "detail", "at"}, failure
        assert failure["reason"], failure
        datetime.fromisoformat(str(failure["at"]))


def status_input(campaign: Campaign) -> dict[str, Any]:
    status = campaign.daemon.status()
    assert "input" in status, f"no 'input' in /status: {sorted(status)}"
    return dict(status["input"])


@pytest.mark.e2e
def test_status_input_counts_every_refusal(campaign: Campaign) -> None:
    """status["input"]["refused"]: "0xC000: <reason>" -> count, adding up to what we were told."""
    refused = status_input(campaign)["refused"]
    for key, count in refused.items():
        assert re.fullmatch(r"0x[0-9A-F]{4}: .+", key) and isinstance(count, int), (key, count)
    ours = Counter(
        f"0x{o.status:04X}"
        for o in [*campaign.outcomes, campaign.bomb, campaign.after]
        if o.status is not None and o.status > 0
    )
    theirs: Counter[str] = Counter()
    for key, count in refused.items():
        theirs[key.split(":")[0]] += count
    assert theirs == ours, f"refusals counted {dict(theirs)}, answered {dict(ours)}: {refused}"


@pytest.mark.e2e
def test_status_input_counts_rejected_associations_and_contexts(campaign: Campaign) -> None:
    given = status_input(campaign)
    rejected = sum(given["associations_rejected"].values())
    assert rejected == len(hostile.BAD_CALLED_AETS), given["associations_rejected"]
    assert sum(given["contexts_rejected"].values()) >= 2, given  # unknown + retired syntax


@pytest.mark.e2e
def test_status_input_counts_nonconformant_uids(campaign: Campaign) -> None:
    given = status_input(campaign)
    taken = [o for o in campaign.outcomes if o.case.nonconformant and o.status == SUCCESS]
    assert given["nonconformant_uids"] >= len(taken) > 0, (given["nonconformant_uids"], taken)


@pytest.mark.e2e
def test_status_input_lists_recent_events(campaign: Campaign) -> None:
    recent = status_input(campaign)["recent"]
    assert recent
    keys = {"at", "kind", "calling_ae", "address", "sop_class_uid", "status", "reason"}
    for event in recent:
        assert keys <= set(event), event
        datetime.fromisoformat(str(event["at"]))


@pytest.mark.e2e
def test_no_phi_in_redis_or_status(campaign: Campaign) -> None:
    """Every key and value in the private Redis, and /status: none of the patient's data."""
    findings = redis_phi(campaign.connection)
    status_text = json.dumps(campaign.daemon.status(), ensure_ascii=False)
    findings += [f"/status: {hit}" for hit in hostile.find_phi(status_text)]
    assert not findings, f"{len(findings)} PHI findings:\n" + "\n".join(findings[:40])


# The daemon is stopped from here on: these come last.
def stopped(campaign: Campaign) -> int:
    if campaign.exit_code is None:
        campaign.exit_code = campaign.daemon.stop()
    return campaign.exit_code


@pytest.mark.e2e
def test_stops_cleanly_after_all_this(campaign: Campaign) -> None:
    """Ctrl-C after the hostile campaign: exit 0, every child gone."""
    assert stopped(campaign) == 0, campaign.daemon.log_tail()
    assert campaign.daemon.family_alive() == []


@pytest.mark.e2e
def test_no_phi_in_the_log(campaign: Campaign) -> None:
    stopped(campaign)
    hits = hostile.find_phi(campaign.daemon.log_path.read_text(errors="replace"))
    assert not hits, f"{len(hits)} PHI findings in the daemon's log:\n" + "\n".join(hits[:40])


@pytest.mark.e2e
def test_nothing_written_outside_the_state_dir(campaign: Campaign) -> None:
    """Spool and quarantine names come from UIDs: no traversal; no temp files in TMPDIR."""
    stopped(campaign)
    daemon = campaign.daemon
    new = files_outside(campaign.root, daemon.state_dir, daemon.log_path) - campaign.files_before
    escaped = list(campaign.root.parent.rglob("*hostile-escape*"))
    escaped += list(Path(os.environ.get("TMPDIR", "/tmp")).glob("*hostile-escape*"))
    assert not new and not escaped, (sorted(new), escaped)


# -- Redis ----------------------------------------------------------------------------------------
def _texts(value: bytes) -> list[str]:
    texts = [value.decode("utf-8", errors="replace"), value.decode("latin-1")]
    if value[:1] in (b"x", b"\x78"):  # zlib (rq's job data is compressed pickle)
        try:
            inflated = zlib.decompress(value)
        except zlib.error:
            pass
        else:
            texts += _texts(inflated)
    return texts


def redis_phi(connection: redis.Redis) -> list[str]:
    findings = []
    for key in connection.scan_iter(count=1000):
        kind = connection.type(key).decode()
        values: list[bytes] = [key]
        if kind == "string":
            values.append(connection.get(key) or b"")
        elif kind == "hash":
            for name, value in connection.hscan_iter(key):
                values += [name, value]
        elif kind == "list":
            values += connection.lrange(key, 0, -1)
        elif kind == "set":
            values += list(connection.sscan_iter(key))
        elif kind == "zset":
            values += [member for member, _ in connection.zscan_iter(key)]
        elif kind == "stream":
            for entry_id, fields in connection.xrange(key):
                values.append(entry_id)
                for name, value in fields.items():
                    values += [name, value]
        for value in values:
            for text in _texts(value):
                findings += [f"{key!r} ({kind}): {hit!r}" for hit in hostile.find_phi(text)]
    return sorted(set(findings))
