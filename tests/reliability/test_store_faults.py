"""Store faults: a database locked by another process, a full disk, a read-only database.

The real daemon where the fault can be made for real (a lock held from this process; a small tmpfs filled up,
when this process may mount one); in-process with faults injected at the SQLite connection boundary otherwise
(tests run as root in CI, where chmod stops nothing, and a file system cannot be remounted read-only while the
daemon holds the database open for writing).

Every fault must give: one clear `store.commit_failed` log line, then `store.recovered`; polling goes on; and
once the store works again every change the Hub made appears exactly once (events, and deliveries).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from conftest import TOKEN, base_config, cli, wait_for, write_config

from watcher.config.load import parse_config
from watcher.core.diff import DiffOptions
from watcher.core.models import FineTuneRef, PollSuccess
from watcher.daemon.app import Watcher
from watcher.delivery.dispatch import Dispatcher
from watcher.delivery.notifiers.base import DeliveryResult
from watcher.errors import StoreError
from watcher.hub.client import HubClient
from watcher.store import SqliteStore
from watcher.testing.simhub import SimHub

FT = {"namespace": "acme", "repo": "bot", "id": "ft_1"}
KEY = "acme/bot/ft_1"
LOG_NOTIFIER = {"name": "out", "type": "log", "format": "json"}


# --- helpers --------------------------------------------------------------------------------------------------


def _events(config: Path) -> list[dict[str, Any]]:
    result = cli("events", "-c", str(config), "--json", "--limit", "10000")
    assert result.returncode == 0, result.stderr
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def _status(config: Path) -> dict[str, Any]:
    result = cli("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    rows = [orjson.loads(line) for line in result.stdout.splitlines()]
    return rows[0] if rows else {}


def _changes(events: list[dict[str, Any]]) -> Counter[tuple[str, int | None]]:
    return Counter((e["type"], (e["data"].get("checkpoint") or {}).get("step")) for e in events)


def _delivered(daemon: Any) -> Counter[str]:
    """Event ids the log notifier printed (one JSON envelope a line on the daemon's stdout)."""
    seen: Counter[str] = Counter()
    for line in daemon.stdout.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(line)
            if isinstance(doc, dict) and str(doc.get("id", "")).startswith("evt_"):
                seen[doc["id"]] += 1
    return seen


def _names(logs: list[dict[str, Any]]) -> list[str]:
    return [entry.get("event", "") for entry in logs]


def _assert_fault_logged_once_then_recovered(logs: list[dict[str, Any]], *, problem: str) -> None:
    names = _names(logs)
    assert names.count("store.commit_failed") == 1, [e for e in logs if e.get("event", "").startswith("store.")]
    assert names.count("store.recovered") == 1, [e for e in logs if e.get("event", "").startswith("store.")]
    assert names.index("store.commit_failed") < names.index("store.recovered")
    failed = logs[names.index("store.commit_failed")]
    assert failed.get("level", failed.get("log_level")) == "error" and failed["fine_tune"] == KEY
    assert problem in failed["error"], failed
    assert KEY in failed["error"], failed  # "cannot commit poll of <key>: <sqlite's reason>"
    assert "poll.crashed" not in names


def _wait_delivered(daemon: Any, config: Path, count: int) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        events = _events(config)
        return events if len(events) >= count and set(_delivered(daemon)) >= {e["id"] for e in events} else None

    return wait_for(done, timeout=30, what=f"{count} events committed and delivered")


def _run_fault_scenario(
    hub: SimHub, daemon: Any, config: Path, *, fault: Any, release: Any, problem: str, big: dict[str, Any]
) -> None:
    """Baseline, one change delivered; then the fault, Hub changes during it, release: all lands exactly once."""
    wait_for(lambda: _status(config).get("last_outcome") == "ok", what="baseline")
    hub.add_checkpoint(KEY, 2, loss=1.5)
    _wait_delivered(daemon, config, 1)  # nothing left in the outbox when the fault starts

    with fault():
        hub.add_checkpoint(KEY, 3, loss=1.0, **big)
        hub.set_deployment_status(KEY, 2, "DEPLOYING")
        hub.remove_checkpoint(KEY, 1)
        wait_for(lambda: "store.commit_failed" in _names(daemon.logs()), timeout=30, what="store.commit_failed")
        hub.add_checkpoint(KEY, 4, loss=0.9)
        # the daemon keeps polling the Hub while its store fails
        asked = len(hub.requests(KEY))
        wait_for(lambda: len(hub.requests(KEY)) > asked, timeout=15, what="a poll during the fault")
        assert _changes(_events(config)) == Counter({("checkpoint.created", 2): 1}), "nothing committed yet"
        release()

    wanted = Counter(
        {
            ("checkpoint.created", 2): 1,
            ("checkpoint.created", 3): 1,
            ("checkpoint.created", 4): 1,
            ("checkpoint.deployment_changed", 2): 1,
            ("checkpoint.updated", 2): 1,  # the simulated Hub sets model_id along with the deployment status
            ("checkpoint.removed", 1): 1,
        }
    )
    wait_for(lambda: _changes(_events(config)) == wanted, timeout=30, what="every change once")
    wait_for(lambda: "store.recovered" in _names(daemon.logs()), what="store.recovered")
    events = _wait_delivered(daemon, config, sum(wanted.values()))
    polled = len(hub.requests(KEY))
    wait_for(lambda: len(hub.requests(KEY)) >= polled + 3, what="three more polls")  # nothing repeats later
    assert daemon.terminate() == 0

    events = _events(config)
    assert _changes(events) == wanted
    assert len({e["id"] for e in events}) == len(events)
    delivered = _delivered(daemon)
    assert {e["id"] for e in events} == set(delivered)
    assert all(count == 1 for count in delivered.values()), delivered
    _assert_fault_logged_once_then_recovered(daemon.logs(), problem=problem)
    assert "Traceback" not in daemon.stderr.read_text()
    status = _status(config)
    assert (status["checkpoints"], status["latest_step"], status["last_outcome"]) == (3, 4, "ok")
    assert status["deployments"] == {"2": "DEPLOYING"}


# --- a lock held by another process: the real daemon ---------------------------------------------------------


def test_a_database_locked_by_another_process(hub: SimHub, tmp_path: Path, daemons: Any) -> None:
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(KEY, 1, loss=2.0)
    config = write_config(tmp_path / "c.toml", base_config(hub, tmp_path, fine_tunes=[FT], notifiers=[LOG_NOTIFIER]))
    daemon = daemons(config)
    lockers: list[sqlite3.Connection] = []

    @contextlib.contextmanager
    def locked() -> Iterator[None]:
        # another process's write lock: the daemon waits out its 5 s busy timeout, then its commit fails
        locker = sqlite3.connect(tmp_path / "watcher.db", timeout=10, isolation_level=None)
        lockers.append(locker)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            locker.close()  # rolls back if still held

    def release() -> None:
        lockers[-1].execute("ROLLBACK")

    _run_fault_scenario(hub, daemon, config, fault=locked, release=release, problem="database is locked", big={})


# --- a full disk: the real daemon on a small tmpfs, when one can be mounted here -------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "state"
    mountpoint.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mountpoint)],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True, timeout=10, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=10, check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system holding folder to the last byte."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:
        for chunk in (1 << 20, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    out.write(block)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
    return filler


def test_a_full_disk(hub: SimHub, tmp_path: Path, daemons: Any, small_tmpfs: Path) -> None:
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(KEY, 1, loss=2.0)
    config = write_config(
        tmp_path / "c.toml",
        base_config(
            hub, tmp_path, fine_tunes=[FT], notifiers=[LOG_NOTIFIER], state={"path": str(small_tmpfs / "w.db")}
        ),
    )
    daemon = daemons(config)
    filler: list[Path] = []

    @contextlib.contextmanager
    def full() -> Iterator[None]:
        filler.append(_fill(small_tmpfs))
        try:
            yield
        finally:
            for path in filler:
                path.unlink(missing_ok=True)

    # 3 MB of inference samples: more than the write-ahead log can have kept from earlier commits
    samples = [{"prompt": f"p{i}", "completion": "x" * 100_000} for i in range(30)]
    _run_fault_scenario(
        hub,
        daemon,
        config,
        fault=full,
        release=lambda: [p.unlink() for p in filler],
        problem="database or disk is full",
        big={"inference_samples": samples},
    )


# --- a read-only database at start: a clear one-line error, exit 1 ---------------------------------------------


@pytest.mark.parametrize("how", ["chmod", "read-only mount"])
def test_a_read_only_database_at_start_is_one_clear_line(hub: SimHub, tmp_path: Path, how: str) -> None:
    if how == "chmod" and os.geteuid() == 0:
        pytest.skip("root writes through chmod; the read-only mount variant covers this as root")
    if how == "read-only mount" and os.geteuid() != 0:
        pytest.skip("mounting needs root; the chmod variant covers this")
    folder = tmp_path / "state"
    folder.mkdir()
    if how == "read-only mount":
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True, check=False
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        db = folder / "w.db"
        store = SqliteStore(db)
        ref = FineTuneRef("acme", "bot", "ft_1", "ft_1")
        store.apply_poll(ref, PollSuccess(({"step": 1},), "h"), options=DiffOptions(), now=time.time())
        store.close()
        if how == "chmod":
            db.chmod(0o444)
            folder.chmod(0o555)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
        config = write_config(tmp_path / "c.toml", base_config(hub, tmp_path, fine_tunes=[FT], state={"path": str(db)}))
        result = cli("run", "-c", str(config), timeout=30)
        assert result.returncode == 1, (result.returncode, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"oxen-watcher: cannot open state database {db}: "), lines
        assert "Traceback" not in result.stderr + result.stdout
    finally:
        if how == "chmod":
            folder.chmod(0o755)
        else:
            subprocess.run(["umount", str(folder)], capture_output=True, check=False)


# --- injected faults at the connection boundary: read-only, full disk, locked, in-process ----------------------


BASELINE_AT = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = BASELINE_AT) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FaultyConnection:
    """A sqlite3 connection whose statements starting with `match` raise `message` the next `times` times."""

    def __init__(self, db: sqlite3.Connection, *, match: str, message: str, times: int) -> None:
        self._db = db
        self.match = match.upper()
        self.message = message
        self.remaining = times
        self.raised = 0

    def _check(self, sql: str) -> None:
        if self.remaining > 0 and " ".join(sql.split()).upper().startswith(self.match):
            self.remaining -= 1
            self.raised += 1
            raise sqlite3.OperationalError(self.message)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._check(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._check(sql)
        return self._db.executemany(sql, *args)

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


INJECTED = [
    pytest.param("UPDATE fine_tunes", "attempt to write a readonly database", id="read-only-file"),
    pytest.param("INSERT INTO checkpoints", "attempt to write a readonly database", id="read-only-folder-mid-tx"),
    pytest.param("INSERT INTO events", "database or disk is full", id="disk-full-mid-tx"),
    pytest.param("COMMIT", "database or disk is full", id="disk-full-at-commit"),
    pytest.param("BEGIN IMMEDIATE", "database is locked", id="locked"),
    pytest.param("COMMIT", "disk I/O error", id="io-error-at-commit"),
]


@pytest.mark.parametrize(("match", "message"), INJECTED)
async def test_injected_store_faults_in_process(hub: SimHub, tmp_path: Path, match: str, message: str) -> None:
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(KEY, 1, loss=2.0)
    hub.add_checkpoint(KEY, 2, loss=1.5)
    clock = Clock()
    data = base_config(hub, tmp_path, fine_tunes=[FT], watch={"failure_threshold": 2})
    config = parse_config(data, source="test.toml", directory=tmp_path)
    db = tmp_path / "w.db"
    store = SqliteStore(db)
    client = HubClient(base_url=hub.url, token=TOKEN, timeout_s=2.0, retry_budget_s=1.0, clock=clock)
    watcher = Watcher(config=config, store=store, client=client, clock=clock)
    try:
        with structlog.testing.capture_logs() as logs:
            baseline = await watcher.poll(KEY)
            assert baseline is not None and baseline.answered_200 and baseline.events == ()
            faulty = FaultyConnection(store._db, match=match, message=message, times=3)
            store._db = faulty  # type: ignore[assignment]

            changes = [
                lambda: hub.add_checkpoint(KEY, 3, loss=1.0),
                lambda: (hub.set_deployment_status(KEY, 2, "ACTIVE"), hub.remove_checkpoint(KEY, 1)),
                lambda: hub.update_checkpoint(KEY, 2, size_bytes=42),
            ]
            for change in changes:  # three polls, each seeing more changes, each failing to commit
                change()
                clock.now += 10
                report = await watcher.poll(KEY)
                assert report is not None and report.events == ()
                assert report.error is not None and message in report.error and KEY in report.error
                # nothing of the failed poll reached the file: no event, the baseline's checkpoints
                reader = SqliteStore(db, readonly=True)
                try:
                    assert reader.recent_events() == []
                    assert sorted(reader.load_state(KEY).checkpoints) == [1, 2]
                    assert reader.statuses([KEY])[0].last_poll_at == BASELINE_AT  # no failed poll wrote
                finally:
                    reader.close()
            assert faulty.raised == 3

            clock.now += 10
            recovered = await watcher.poll(KEY)
            assert recovered is not None and recovered.answered_200 and recovered.error is None
            clock.now += 10
            quiet = await watcher.poll(KEY)
            assert quiet is not None and quiet.answered_200 and quiet.events == ()

        assert sorted((e.type, e.data["checkpoint"]["step"]) for e in recovered.events) == [
            ("checkpoint.created", 3),
            ("checkpoint.deployment_changed", 2),
            ("checkpoint.removed", 1),
            ("checkpoint.updated", 2),
        ]
        _assert_fault_logged_once_then_recovered(logs, problem=message)
        assert not [e for e in logs if e["event"] == "poll.failed"], "a store fault is not a failed poll"
        assert not watcher.health[KEY].store_failing
    finally:
        await watcher.aclose()
        store._db = store._db._db if isinstance(store._db, FaultyConnection) else store._db  # type: ignore[attr-defined]
        store.close()
    reopened = SqliteStore(db)
    try:
        assert sorted(reopened.load_state(KEY).checkpoints) == [2, 3]
        assert len(reopened.recent_events()) == 4
        (status,) = reopened.statuses([KEY])
        assert (status.consecutive_failures, status.failing, status.last_outcome) == (0, False, "ok")
    finally:
        reopened.close()


# --- the dispatcher when the store cannot record a delivery ----------------------------------------------------


class CountingNotifier:
    digest_over = None

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, events: Any) -> DeliveryResult:
        self.sent += [event.id for event in events]
        return DeliveryResult("delivered")

    async def aclose(self) -> None:
        return None


async def test_a_delivery_the_store_cannot_record_is_not_resent_in_a_hot_loop(tmp_path: Path) -> None:
    config = parse_config({"notifiers": [{"name": "out", "type": "log"}]}, directory=tmp_path)
    store = SqliteStore(tmp_path / "w.db")
    ref = FineTuneRef("acme", "bot", "ft_1", "ft_1")
    route = lambda event: ["out"]
    store.apply_poll(ref, PollSuccess((), "a"), options=DiffOptions(), now=time.time(), route=route)
    store.apply_poll(ref, PollSuccess(({"step": 1},), "b"), options=DiffOptions(), now=time.time(), route=route)
    record = store.record_delivery
    outage_ends = time.monotonic() + 1.0

    def record_delivery(*args: Any, **kwargs: Any) -> None:  # a full disk for one second
        if time.monotonic() < outage_ends:
            raise StoreError("cannot write the outbox: database or disk is full")
        record(*args, **kwargs)

    store.record_delivery = record_delivery  # type: ignore[method-assign]
    notifier = CountingNotifier()
    dispatcher = Dispatcher(store=store, notifiers={"out": notifier}, configs=config.notifiers)
    stop = asyncio.Event()
    try:
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(dispatcher.run(stop))
            deadline = time.monotonic() + 15
            while (
                store.deliveries_of([e.id for e in store.recent_events()])[store.recent_events()[0].id][0].state
                != "delivered"
            ):
                assert time.monotonic() < deadline, "not delivered after the outage"
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(task, 10)
        (event,) = store.recent_events()
        assert notifier.sent and set(notifier.sent) == {event.id}  # delivered, at least once
        assert store.deliveries_of([event.id])[event.id][0].state == "delivered"
        # at least once, but not a flood: a few attempts during the outage, and the fault logged once or twice
        assert len(notifier.sent) <= 5, f"{len(notifier.sent)} sends of one event"
        errors = [e for e in logs if e.get("log_level") in ("error", "critical")]
        assert len(errors) <= 2, Counter(e["event"] for e in errors)
    finally:
        store.close()
