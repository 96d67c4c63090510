"""SqliteStore on real files: versioned schema and migrations, WAL, auto_vacuum, read-only use of a missing file,
the pending-only indexes, and retention shrinking the file. (What every store implementation must do, one
transaction per poll, no needless writes and two writers among it, is in tests/store_contract.)"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from store_contract.databases import SqliteFile
from store_contract.support import DAY, OPTIONS, OTHER, REF, T0, apply, counter_ids, cp, failed, success, types

from watcher.core.diff import fingerprint
from watcher.core.models import CHECKPOINT_CREATED, PollUnchanged
from watcher.errors import StoreError
from watcher.store import MIGRATIONS, SCHEMA_VERSION, SqliteStore, open_store


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "watcher.db"


@pytest.fixture
def stores() -> Iterator[Callable[..., SqliteStore]]:
    """A factory of stores closed at the end of the test."""
    opened: list[SqliteStore] = []

    def make(path: Path, **kwargs: Any) -> SqliteStore:
        store = SqliteStore(path, **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(db_path: Path, stores: Callable[..., SqliteStore]) -> SqliteStore:
    return stores(db_path, new_id=counter_ids())


# --- schema and file ------------------------------------------------------------------------------


def test_new_database_has_current_schema_version_and_wal(db_path: Path, store: SqliteStore) -> None:
    assert db_path.exists()
    assert store.schema_version == SCHEMA_VERSION
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental, from the first table on
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"schema_version", "fine_tunes", "checkpoints", "events"} <= tables


@pytest.mark.parametrize("setup", ["empty file", "empty database", "version 0"])
def test_older_database_is_migrated(db_path: Path, stores: Callable[..., SqliteStore], setup: str) -> None:
    db_path.parent.mkdir(parents=True)
    if setup == "empty file":
        db_path.write_bytes(b"")
    else:
        with sqlite3.connect(db_path) as db:
            db.execute("CREATE TABLE unrelated (x)")
            if setup == "version 0":
                db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                db.execute("INSERT INTO schema_version VALUES (0)")
    store = stores(db_path)
    assert store.schema_version == SCHEMA_VERSION
    assert apply(store, success(cp(1))).state.baselined
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_every_released_version_is_migrated_keeping_the_baseline(
    db_path: Path, stores: Callable[..., SqliteStore], version: int
) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (?)", (version,))
        for statements in MIGRATIONS[:version]:
            for statement in statements:
                statement(db) if callable(statement) else db.execute(statement)
        db.execute(
            "INSERT INTO fine_tunes (fine_tune_key, baselined, body_hash, last_outcome) VALUES (?, 1, 'h1', 'ok')",
            (REF.key,),
        )
        db.execute(
            "INSERT INTO checkpoints (fine_tune_key, step, fingerprint, data) VALUES (?, 1, ?, ?)",
            (REF.key, fingerprint(cp(1)), orjson.dumps(cp(1)).decode()),
        )
    store = stores(db_path)
    assert store.schema_version == SCHEMA_VERSION
    assert store.auto_vacuum == "incremental"  # converted by a VACUUM after the migration
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert apply(store, PollUnchanged("h1")).events == ()
    assert apply(store, success(cp(1)), now=T0 + 1).events == ()  # the old baseline holds
    assert types(apply(store, success(cp(1), cp(2)), now=T0 + 2)) == [CHECKPOINT_CREATED]


@pytest.mark.parametrize("readonly", [False, True])
def test_a_file_that_is_not_a_database_is_a_store_error(db_path: Path, readonly: bool) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not an SQLite database, just text " * 100)
    with pytest.raises(StoreError):
        open_store(db_path, readonly=readonly)


def test_readonly_missing_file_is_an_empty_store_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "watcher.db"
    store = open_store(path, readonly=True)
    try:
        assert store.statuses() == []
        assert store.recent_events() == []
        assert store.events_after(0) == []
        assert store.not_before(REF.key) is None
        [status] = store.statuses([REF.key])
        assert (status.key, status.baselined, status.checkpoints, status.last_poll_at) == (REF.key, False, 0, None)
        # a dry run against it works and announces nothing on the first (baseline) poll
        dry = store.apply_poll(REF, success(cp(1), cp(2)), options=OPTIONS, now=T0, commit=False)
        assert dry is not None and dry.events == () and dry.state.baselined
    finally:
        store.close()
    assert not path.exists()
    assert not path.parent.exists()
    assert list(tmp_path.iterdir()) == []


# --- apply_poll ---------------------------------------------------------------------------------------


def test_readonly_sqlite_store_on_a_missing_file_fails_without_creating_it(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    with pytest.raises(StoreError):
        SqliteStore(path, readonly=True)
    assert not path.exists()


# --- retention and a large history --------------------------------------------------------------------------


def everywhere(event: Any) -> list[str]:
    return ["hook", "slack"]


def many_events(store: SqliteStore, *, polls: int, per_poll: int, start: float, step_s: float) -> list[str]:
    """`polls` polls `step_s` apart, each adding `per_poll` checkpoints (an event and two outbox rows each)."""
    ids: list[str] = []
    for i in range(polls):
        steps = range(1, (i + 1) * per_poll + 1)
        poll = success(*(cp(s, note="x" * 200) for s in steps))
        ids += [e.id for e in apply(store, poll, now=start + i * step_s, route=everywhere).events]
    return ids


def deliver_all(store: SqliteStore, ids: list[str], now: float) -> None:
    for notifier in ("hook", "slack"):
        store.record_delivery(notifier, ids, state="delivered", now=now)


def test_an_old_database_is_converted_to_incremental_auto_vacuum_keeping_its_rows(
    db_path: Path, stores: Callable[..., SqliteStore]
) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as db:  # a release-2 database, as it was created then
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (2)")
        for statements in MIGRATIONS[:2]:
            for statement in statements:
                db.execute(statement)
        db.execute("INSERT INTO events (id, type, fine_tune_key, created_at, envelope) VALUES ('e', 't', 'k', 1, '{}')")
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    store = stores(db_path)
    assert (store.auto_vacuum, store.schema_version) == ("incremental", SCHEMA_VERSION)
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT id FROM events").fetchall() == [("e",)]
        indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"events_created", "events_type", "deliveries_pending_lane", "deliveries_pending_due"} <= indexes
    assert "deliveries_lane" not in indexes  # replaced by the pending-only indexes


def test_the_conversion_runs_beside_a_reading_process(db_path: Path, stores: Callable[..., SqliteStore]) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as db:  # a release-2 database, in WAL mode as that release left it
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (2)")
        for statements in MIGRATIONS[:2]:
            for statement in statements:
                db.execute(statement)
    reader = sqlite3.connect(db_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM events").fetchall()  # another process in a read transaction
    try:
        store = stores(db_path, busy_timeout_s=0.2)
        assert (store.auto_vacuum, store.schema_version) == ("incremental", SCHEMA_VERSION)
        assert apply(store, success(cp(1))).state.baselined
        assert reader.execute("SELECT COUNT(*) FROM events").fetchall() == [(0,)]  # its snapshot still reads
    finally:
        reader.execute("ROLLBACK")
        reader.close()
    assert stores(db_path).load_state(REF.key).baselined


def plan(store: SqliteStore, sql: str, args: tuple[Any, ...] = ()) -> str:
    return " | ".join(row[-1] for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}", args))


def test_hot_queries_read_pending_rows_only_and_events_by_index(store: SqliteStore) -> None:
    from watcher.store.sqlite.prune import _OLD

    stats = plan(
        store, "SELECT notifier, COUNT(*), MIN(queued_at) FROM deliveries WHERE state = 'pending' GROUP BY notifier"
    )
    assert "COVERING INDEX deliveries_pending_due" in stats  # pending rows only, never the table
    due = plan(
        store, "SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'pending' AND notifier IN (?, ?)", ("a", "b")
    )
    assert "COVERING INDEX deliveries_pending_due" in due
    heads = plan(
        store,
        "SELECT event_id FROM deliveries d WHERE d.state = 'pending' AND d.notifier = ? AND d.next_attempt_at <= ? "
        "AND d.event_seq = (SELECT MIN(h.event_seq) FROM deliveries h WHERE h.state = 'pending' "
        "AND h.notifier = d.notifier AND h.fine_tune_key = d.fine_tune_key) ORDER BY d.next_attempt_at, d.event_seq",
        ("a", 1.0),
    )
    assert "deliveries_pending_due" in heads and "deliveries_pending_lane" in heads
    assert "SCAN d" not in heads and "SCAN deliveries" not in heads
    lane = plan(
        store,
        "SELECT event_id FROM deliveries WHERE state = 'pending' AND notifier = ? AND fine_tune_key = ? "
        "AND batch_id = ? ORDER BY event_seq",
        ("a", "k", "b"),
    )
    assert "deliveries_pending_lane" in lane
    by_type = plan(store, "SELECT seq FROM events WHERE type = ? ORDER BY seq DESC LIMIT 5", ("t",))
    assert "events_type" in by_type and "TEMP B-TREE" not in by_type
    assert "events_type" in plan(store, "SELECT type FROM events WHERE type > ? ORDER BY type LIMIT 1", ("a",))
    old = plan(store, f"SELECT e.seq {_OLD} ORDER BY e.created_at LIMIT 5", (1.0,))
    assert "events_created" in old and "TEMP B-TREE" not in old
    assert "sqlite_autoindex_deliveries_1" in old  # the pending check reads one event's rows by primary key
    dead = plan(store, "SELECT event_id FROM deliveries WHERE state = 'dead' AND queued_at >= ?", (1.0,))
    assert "deliveries_dead" in dead


def test_prune_dry_run_writes_nothing_and_estimates_close_to_the_real_pass(db_path: Path, store: SqliteStore) -> None:
    apply(store, success(cp(0)), now=T0, route=everywhere)
    ids = many_events(store, polls=20, per_poll=50, start=T0 + 1, step_s=1)
    deliver_all(store, ids, T0 + 100)
    before = SqliteFile(db_path).snapshot(), sqlite3.connect(db_path).execute("SELECT * FROM deliveries").fetchall()
    dry = store.prune(now=T0 + 31 * DAY, retain_s=30 * DAY, dry_run=True)
    assert (dry.events, dry.deliveries) == (len(ids), 2 * len(ids)) and len(ids) > 1000
    assert (
        SqliteFile(db_path).snapshot(),
        sqlite3.connect(db_path).execute("SELECT * FROM deliveries").fetchall(),
    ) == before
    real = store.prune(now=T0 + 31 * DAY, retain_s=30 * DAY)
    assert (real.events, real.deliveries, real.done) == (len(ids), 2 * len(ids), True)
    assert 0.5 < dry.bytes_freed / real.bytes_freed < 1.5, (dry.bytes_freed, real.bytes_freed)
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0  # every freed page went back


def test_with_retention_the_file_stops_growing(db_path: Path, store: SqliteStore) -> None:
    apply(store, success(cp(0)), now=T0, route=everywhere)
    pages = []
    for day in range(14):
        now = T0 + day * DAY
        for i in range(4):  # each poll: 25 checkpoints replace the previous 25 (50 events, 100 outbox rows)
            first = (day * 4 + i) * 25 + 1
            poll = success(*(cp(s, note="y" * 300) for s in range(first, first + 25)))
            events = apply(store, poll, now=now + i, route=everywhere).events
            deliver_all(store, [e.id for e in events], now + i)
        store.prune(now=now + 10, retain_s=3 * DAY, batch=40)
        pages.append(store._pragma("page_count"))
    steady = pages[4:]  # from the day the first events fall out of the 3-day window
    assert max(steady) <= pages[3] * 1.1, pages
    assert store._pragma("freelist_count") == 0


def test_prune_never_holds_the_write_lock_for_the_whole_pass(db_path: Path, stores: Callable[..., SqliteStore]) -> None:
    store = stores(db_path, new_id=counter_ids())
    apply(store, success(cp(0)), now=T0, route=everywhere)
    deliver_all(store, many_events(store, polls=10, per_poll=30, start=T0 + 1, step_s=1), T0 + 50)
    other = stores(db_path, busy_timeout_s=5.0)
    commits: list[int] = []

    def poll_between() -> None:  # a second writer commits between the batches of one pass
        apply(other, failed(503), ref=OTHER, now=T0 + 31 * DAY)
        commits.append(1)

    passes = 0
    while not store.prune(now=T0 + 31 * DAY, retain_s=30 * DAY, batch=50, max_batches=1).done:
        passes += 1
        poll_between()
        assert passes < 100
    assert passes >= 6 and len(commits) == passes
    assert [e.fine_tune_key for _, e in store.events_after(0)] == [OTHER.key]  # only the new one is left


def test_a_large_old_database_is_converted_by_prune_not_at_a_daemon_start(
    db_path: Path, stores: Callable[..., SqliteStore]
) -> None:
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (2)")
        for statements in MIGRATIONS[:2]:
            for statement in statements:
                db.execute(statement)
    import structlog

    with structlog.testing.capture_logs() as logs:
        small_limit = stores(db_path, convert_max_bytes=1024)
    assert (small_limit.auto_vacuum, small_limit.schema_version) == ("none", SCHEMA_VERSION)
    assert [entry["event"] for entry in logs] == ["store.conversion_deferred"]
    assert "oxen-watcher prune" in logs[0]["hint"]
    small_limit.close()
    assert stores(db_path, convert_max_bytes=None).auto_vacuum == "incremental"


def test_a_large_prune_rewrites_the_file_once_and_the_daemon_defers_a_big_rewrite(
    db_path: Path, store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import structlog

    from watcher.store.sqlite import prune as sqlite_prune

    apply(store, success(cp(0)), now=T0, route=everywhere)
    deliver_all(store, many_events(store, polls=10, per_poll=40, start=T0 + 1, step_s=1), T0 + 50)
    full = store._pragma("page_count")
    monkeypatch.setattr(sqlite_prune, "REWRITE_MAX_BYTES", 0)  # as if the live data were larger than allowed
    monkeypatch.setattr(sqlite_prune, "FULL_REWRITE_MIN_PAGES", 16)  # and the history long
    with structlog.testing.capture_logs() as logs:
        while not store.prune(now=T0 + 31 * DAY, retain_s=30 * DAY, batch=100, max_batches=1).done:
            pass
        store.prune(now=T0 + 31 * DAY, retain_s=30 * DAY, max_batches=1)
    assert [entry["event"] for entry in logs] == ["store.vacuum_deferred"]  # logged once, not per pass
    assert store._pragma("freelist_count") > full // 2 and store._pragma("page_count") == full
    report = store.prune(now=T0 + 31 * DAY, retain_s=30 * DAY)  # what `oxen-watcher prune` does
    assert report.events == 0 and report.bytes_freed > full // 2 * 4096
    assert store._pragma("freelist_count") == 0 and store._pragma("page_count") < full // 2


# --- `status` and `events` on a database nothing can write: a read-only mount, a folder without write rights ---


@pytest.fixture(params=["read-only mount", "chmod"])
def unwritable_folder(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A folder, and how to make it unwritable (remount read-only as root, chmod otherwise: root writes through
    chmod, and only root mounts)."""
    import os
    import subprocess

    how = request.param
    folder = tmp_path / "state"
    folder.mkdir()
    if how == "chmod" and os.geteuid() == 0:
        pytest.skip("root writes through chmod; the read-only mount variant covers this as root")
    if how == "read-only mount":
        if os.geteuid() != 0:
            pytest.skip("mounting needs root; the chmod variant covers this")
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True, check=False
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")

    def lock() -> None:
        if how == "chmod":
            for path in folder.iterdir():
                path.chmod(0o444)
            folder.chmod(0o555)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)

    try:
        yield folder, lock
    finally:
        if how == "chmod":
            folder.chmod(0o755)
        else:
            subprocess.run(["umount", str(folder)], capture_output=True, check=False)


@pytest.mark.parametrize("leftovers", ["closed cleanly", "with its -wal and -shm files"])
def test_status_and_events_read_a_database_nothing_can_write(
    hub: Any, tmp_path: Path, unwritable_folder: tuple[Path, Callable[[], None]], leftovers: str
) -> None:
    import shutil

    from conftest import base_config, cli, write_config

    folder, lock = unwritable_folder
    db = folder / "w.db"
    source = tmp_path / "source.db"
    writer = SqliteStore(source)
    apply(writer, success(cp(1)))
    created = apply(writer, success(cp(1), cp(2)), now=T0 + 1)
    if leftovers == "closed cleanly":
        writer.close()
    # else: copied while open, as a backup of a running daemon's folder is (the last commit only in the -wal)
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{source}{suffix}").exists():
            shutil.copyfile(f"{source}{suffix}", f"{db}{suffix}")
    if leftovers != "closed cleanly":
        writer.close()
    assert Path(f"{db}-shm").exists() == (leftovers != "closed cleanly")
    lock()
    fine_tune = {"namespace": REF.namespace, "repo": REF.repo, "id": REF.id}
    config = write_config(
        tmp_path / "c.toml", base_config(hub, tmp_path, fine_tunes=[fine_tune], state={"path": str(db)})
    )
    status = cli("status", "-c", str(config), "--json")
    assert status.returncode == 0, status.stderr
    (row,) = [orjson.loads(line) for line in status.stdout.splitlines()]
    assert (row["checkpoints"], row["latest_step"]) == (2, 2)
    events = cli("events", "-c", str(config), "--json")
    assert events.returncode == 0, events.stderr
    assert [orjson.loads(line)["id"] for line in events.stdout.splitlines()] == [e.id for e in created.events]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["w.db"] + (["w.db-shm", "w.db-wal"] if leftovers != "closed cleanly" else [])
    )
