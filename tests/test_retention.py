"""Retention: the daemon's job (through the store thread, never fatal), `prune [--dry-run]`,
`redeliver --dead --since`, and `[state] retain_days`."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from conftest import cli, write_config
from store_contract.support import DAY, REF, apply, counter_ids, cp, success

from watcher.daemon.retention import RetentionJob, parse_since
from watcher.errors import StoreError
from watcher.store import PruneReport, SqliteStore

NOW = 1_780_000_000.0


def everywhere(event: Any) -> list[str]:
    return ["ci"]


def aged_store(path: Path, *, now: float = NOW) -> tuple[SqliteStore, list[str], list[str]]:
    """40 old events (delivered but one, still pending), 10 recent ones; returns the store and both id lists."""
    store = SqliteStore(path, new_id=counter_ids())
    apply(store, success(cp(0)), now=now - 60 * DAY)
    old = [
        e.id for e in apply(store, success(*(cp(s) for s in range(41))), now=now - 50 * DAY, route=everywhere).events
    ]
    recent = [e.id for e in apply(store, success(*(cp(s) for s in range(51))), now=now - DAY, route=everywhere).events]
    store.record_delivery("ci", old[:-1], state="delivered", now=now - 50 * DAY)
    return store, old, recent


@pytest.fixture
def in_store() -> Iterator[Any]:
    executor = ThreadPoolExecutor(1, "store")

    async def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, lambda: fn(*args, **kwargs))

    yield run
    executor.shutdown(wait=True)


async def test_the_job_prunes_through_the_store_thread_and_logs_counts(tmp_path: Path, in_store: Any) -> None:
    store, old, recent = aged_store(tmp_path / "w.db")
    calls: list[int] = []

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("max_batches"))
        return await in_store(fn, *args, **kwargs)

    job = RetentionJob(store=store, in_store=counting, retain_days=30, clock=lambda: NOW, batch=10)
    with structlog.testing.capture_logs() as logs:
        report = await job.run_once()
    assert report is not None and (report.events, report.deliveries) == (39, 39)
    assert len(calls) >= 4 and set(calls) == {1}  # one short transaction per store call
    [line] = [entry for entry in logs if entry["event"] == "retention.pruned"]
    assert (line["events"], line["deliveries"], line["retain_days"]) == (39, 39, 30)
    assert line["bytes_freed"] == report.bytes_freed  # the line tells what the passes freed:
    assert report.bytes_freed > 0 and report.bytes_freed % 4096 == 0  # whole pages, which the 39 events held
    left = {e.id for _, e in store.events_after(0)}
    assert left == {old[-1], *recent}  # the pending one stays, however old
    with structlog.testing.capture_logs() as logs:
        again = await job.run_once()
    assert again == PruneReport(0, 0, 0, True)
    assert [entry for entry in logs if entry["event"] == "retention.pruned"] == []  # nothing removed: no line
    store.close()


class FailingStore:
    """A store whose prune fails the way a full disk or a lock would."""

    def __init__(self) -> None:
        self.calls = 0

    def prune(self, **kwargs: Any) -> PruneReport:
        self.calls += 1
        raise StoreError("cannot prune old events: database is locked")


async def test_a_failing_pass_is_logged_with_its_traceback_and_never_raises(in_store: Any) -> None:
    failing = FailingStore()
    job = RetentionJob(store=failing, in_store=in_store, retain_days=7, clock=lambda: NOW)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        assert await job.run_once() is None
    [line] = [entry for entry in logs if entry["event"] == "retention.failed"]
    assert line["exc_info"] is True and line["log_level"] == "error"
    assert job.failures == 1 and failing.calls == 1


async def test_apscheduler_runs_a_pass_at_start_then_every_interval(tmp_path: Path, in_store: Any) -> None:
    store, _old, _recent = aged_store(tmp_path / "w.db")
    job = RetentionJob(store=store, in_store=in_store, retain_days=30, clock=lambda: NOW, every_s=0.05)
    scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop(), timezone=UTC)
    job.schedule(scheduler)
    [scheduled] = scheduler.get_jobs()
    assert (scheduled.id, scheduled.max_instances, scheduled.coalesce) == ("retention", 1, True)
    scheduler.start()
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while job.runs < 3:  # the first pass at start, then one per interval
            assert asyncio.get_running_loop().time() < deadline, f"only {job.runs} retention passes ran"
            await asyncio.sleep(0.01)
    finally:
        scheduler.shutdown(wait=False)
        job.stop()
    assert job.failures == 0
    assert job.last is not None and job.last.done
    # a stopped pass may still be pruning on the store thread: close there, after it (closing under it crashes)
    await in_store(store.close)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW - 7 * DAY),
        ("12h", NOW - 12 * 3600),
        ("30m", NOW - 1800),
        ("45s", NOW - 45),
        ("1.5d", NOW - 1.5 * DAY),
        ("2026-01-31T12:00:00Z", 1769860800.0),
        ("2026-01-31T13:00:00+01:00", 1769860800.0),
    ],
)
def test_parse_since(text: str, expected: float) -> None:
    assert parse_since(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "-7d", "7w", "2026-01-31T12:00:00", "yesterday"])
def test_parse_since_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_since(text, now=NOW)


# --- the command line ---------------------------------------------------------------------------------


def config_file(tmp_path: Path, **state: Any) -> Path:
    return write_config(
        tmp_path / "c.toml",
        {
            "hub": {"url": "http://127.0.0.1:9", "token": "t"},
            "state": {"path": str(tmp_path / "w.db"), **state},
            "notifiers": [{"name": "ci", "type": "log"}],
        },
    )


def rows(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM events").fetchone()[0], db.execute(
            "SELECT COUNT(*) FROM deliveries"
        ).fetchone()[0]


def test_prune_dry_run_then_prune(tmp_path: Path) -> None:
    now = time.time()
    store, _old, _recent = aged_store(tmp_path / "w.db", now=now)
    store.close()
    config = config_file(tmp_path, retain_days=30)
    before = rows(tmp_path / "w.db")
    dry = cli("prune", "-c", str(config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 39 events and 39 deliveries older than 30 days, freeing about" in dry.stdout
    assert rows(tmp_path / "w.db") == before
    real = cli("prune", "--config", str(config))
    assert real.returncode == 0, real.stderr
    assert "removed 39 events and 39 deliveries older than 30 days, freed" in real.stdout
    assert rows(tmp_path / "w.db") == (before[0] - 39, before[1] - 39)
    again = cli("prune", "-c", str(config))
    assert "removed 0 events and 0 deliveries" in again.stdout


def test_prune_without_a_database_creates_none(tmp_path: Path) -> None:
    result = cli("prune", "-c", str(config_file(tmp_path)))
    assert result.returncode == 0 and "nothing to prune" in result.stdout
    assert not (tmp_path / "w.db").exists()


@pytest.mark.parametrize("value", [0, -3, "30", 1.5, True])
def test_a_bad_retain_days_exits_78_naming_the_key(tmp_path: Path, value: Any) -> None:
    result = cli("check-config", "-c", str(config_file(tmp_path, retain_days=value)))
    assert result.returncode == 78
    assert "state.retain_days" in result.stderr


def test_redeliver_dead_is_bounded_by_since(tmp_path: Path) -> None:
    now = time.time()
    store = SqliteStore(tmp_path / "w.db", new_id=counter_ids())
    apply(store, success(cp(0)), now=now - 60 * DAY)
    ancient = [e.id for e in apply(store, success(cp(0), cp(1)), now=now - 40 * DAY, route=everywhere).events]
    week = [e.id for e in apply(store, success(cp(0), cp(1), cp(2)), now=now - 5 * DAY, route=everywhere).events]
    hour = [e.id for e in apply(store, success(cp(0), cp(1), cp(2), cp(3)), now=now - 1800, route=everywhere).events]
    store.record_delivery("ci", ancient + week + hour, state="dead", now=now, error="HTTP 400")
    config = config_file(tmp_path, retain_days=30)

    def pending() -> set[str]:
        found = store.deliveries_of(ancient + week + hour)
        return {event_id for event_id, rows in found.items() if any(d.state == "pending" for d in rows)}

    result = cli("redeliver", "-c", str(config), "--dead", "--since", "1h")
    assert result.returncode == 0 and "queued 1 deliveries" in result.stdout, result.stderr
    assert pending() == set(hour)
    default = cli("redeliver", "-c", str(config), "--dead")  # the retention window: 30 days
    assert "queued 1 deliveries" in default.stdout
    assert pending() == set(hour + week)
    since_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 45 * DAY))
    assert "queued 1 deliveries" in cli("redeliver", "-c", str(config), "--dead", "--since", since_time).stdout
    assert pending() == set(hour + week + ancient)
    bad = cli("redeliver", "-c", str(config), "--dead", "--since", "soon")
    assert bad.returncode == 2 and "--since" in bad.stderr
    assert cli("redeliver", "-c", str(config), REF.key, "--since", "1h").returncode == 2  # --since needs --dead
    store.close()


def test_events_type_is_filtered_in_sql_with_glob_rules(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "w.db", new_id=counter_ids())
    apply(store, success(cp(0)), now=NOW)
    apply(store, success(cp(0), cp(1)), now=NOW + 1)
    apply(store, success(cp(1)), now=NOW + 2)
    store.close()
    config = config_file(tmp_path)
    result = cli("events", "-c", str(config), "--type", "checkpoint.[!r]*", "--json")
    assert result.returncode == 0, result.stderr
    assert [line.count('"checkpoint.created"') for line in result.stdout.splitlines()] == [1]


def test_a_rewrite_of_the_file_is_announced_as_a_planned_long_operation_while_it_runs(tmp_path: Path) -> None:
    """The daemon's bounded prune rewrites the file (VACUUM) after freeing most of it: `long_operation` says so
    for exactly that long (health reads it from the event loop), with an expected end from the live bytes."""
    path = tmp_path / "watcher.db"
    store = SqliteStore(path)
    row = 64 * 1024
    for prefix, count, at in (("old-", 320, NOW - 400 * DAY), ("live-", 64, NOW)):  # 20 MiB old, 4 MiB live
        store._db.execute(
            "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?) "
            "INSERT INTO events (id, type, fine_tune_key, created_at, envelope) "
            "SELECT ? || i, 'checkpoint.created', 'a/b/c', ?, hex(zeroblob(?)) FROM k",
            (count, prefix, at, row // 2),
        )
    seen: list[Any] = []
    store._db.set_progress_handler(lambda: seen.append(store.long_operation), 1000)  # called inside each statement
    assert store.long_operation is None
    with structlog.testing.capture_logs() as logs:
        while not store.prune(now=NOW, retain_s=30 * DAY, max_batches=1).done:
            pass
    store._db.set_progress_handler(None, 0)
    assert store.long_operation is None
    (started,) = [entry for entry in logs if entry["event"] == "store.long_operation"]
    (ended,) = [entry for entry in logs if entry["event"] == "store.long_operation_ended"]
    assert started["what"] == ended["what"] == "compacting the state database, 4 MiB"
    assert started["expected_s"] == 61  # a minute plus 4 MiB at 4 MiB/s
    during = {operation.what for operation in seen if operation is not None}
    assert during == {"compacting the state database, 4 MiB"}, "not set while the VACUUM ran"
    assert path.stat().st_size < 8 * 1024 * 1024
    store.close()
