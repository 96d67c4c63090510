"""SqliteStore on real files: versioned schema, WAL, one transaction per poll, no needless writes,
two writers, reports, hold-backs and restarts."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from watcher.diff import DiffOptions, fingerprint
from watcher.errors import StoreError
from watcher.models import (
    CHECKPOINT_CREATED,
    CHECKPOINT_DEPLOYMENT_CHANGED,
    CHECKPOINT_REMOVED,
    CHECKPOINT_UPDATED,
    FINE_TUNE_NOT_FOUND,
    FINE_TUNE_POLL_FAILING,
    FINE_TUNE_POLL_RECOVERED,
    FineTuneRef,
    PollFailed,
    PollNotFound,
    PollSuccess,
    PollUnchanged,
)
from watcher.schema import body_hash
from watcher.store import MIGRATIONS, SCHEMA_VERSION, Committed, SqliteStore, open_store

REF = FineTuneRef(namespace="ox", repo="models", id="ft_1", name="first")
OTHER = FineTuneRef(namespace="ox", repo="models", id="ft_2", name="second")
OPTIONS = DiffOptions()
T0 = 1_750_000_000.0


def cp(step: int, *, loss: float | None = None, status: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "step": step,
        "created_at": f"2025-06-01T12:{step % 60:02d}:00Z",
        "deployment_status": status,
        "metrics": {"loss": loss if loss is not None else round(1.0 / (step + 1), 6), "learning_rate": 1e-5},
        "model_name": f"first-step-{step}",
        "path": f"checkpoints/step-{step}",
        "size_bytes": 1000 + step,
        **extra,
    }


def success(*checkpoints: dict[str, Any], salt: str = "") -> PollSuccess:
    """A PollSuccess as the app builds it: sorted checkpoints and the hash of the body."""
    body = orjson.dumps({"checkpoints": list(checkpoints), "status": "success", "salt": salt})
    return PollSuccess(tuple(sorted(checkpoints, key=lambda c: c["step"])), body_hash(body))


def failed(status: int | None = 503, retry_after_s: float | None = None, outcome: str = "error") -> PollFailed:
    return PollFailed(f"Hub answered {status}", status, outcome, retry_after_s)  # type: ignore[arg-type]


def counter_ids(prefix: str = "evt_t") -> Callable[[], str]:
    numbers = itertools.count(1)
    lock = threading.Lock()

    def new_id() -> str:
        with lock:
            return f"{prefix}{next(numbers):06d}"

    return new_id


def snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the store's tables (with rowids), read through a separate connection."""
    with sqlite3.connect(path) as db:
        return {
            "fine_tunes": db.execute("SELECT rowid, * FROM fine_tunes ORDER BY fine_tune_key").fetchall(),
            "checkpoints": db.execute("SELECT rowid, * FROM checkpoints ORDER BY fine_tune_key, step").fetchall(),
            "events": db.execute("SELECT * FROM events ORDER BY seq").fetchall(),
        }


def event_rows(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, type, fine_tune_key FROM events ORDER BY seq").fetchall()


def install_write_counter(path: Path) -> Callable[[], dict[str, int]]:
    """Triggers that log every INSERT, UPDATE and DELETE on checkpoint rows; returns a reader of the counts."""
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE checkpoint_writes (op TEXT NOT NULL);
            CREATE TRIGGER count_cp_insert AFTER INSERT ON checkpoints BEGIN
                INSERT INTO checkpoint_writes VALUES ('insert'); END;
            CREATE TRIGGER count_cp_update AFTER UPDATE ON checkpoints BEGIN
                INSERT INTO checkpoint_writes VALUES ('update'); END;
            CREATE TRIGGER count_cp_delete AFTER DELETE ON checkpoints BEGIN
                INSERT INTO checkpoint_writes VALUES ('delete'); END;
            """
        )

    def read() -> dict[str, int]:
        with sqlite3.connect(path) as db:
            rows = db.execute("SELECT op, COUNT(*) FROM checkpoint_writes GROUP BY op").fetchall()
            db.execute("DELETE FROM checkpoint_writes")
        return dict(rows)

    return read


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


def apply(store: SqliteStore, result: Any, *, ref: FineTuneRef = REF, now: float = T0, **kw: Any) -> Committed:
    committed = store.apply_poll(ref, result, options=kw.pop("options", OPTIONS), now=now, **kw)
    assert committed is not None
    return committed


def types(committed: Committed) -> list[str]:
    return [event.type for event in committed.events]


# --- schema and file ------------------------------------------------------------------------------


def test_new_database_has_current_schema_version_and_wal(db_path: Path, store: SqliteStore) -> None:
    assert db_path.exists()
    assert store.schema_version == SCHEMA_VERSION
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"schema_version", "fine_tunes", "checkpoints", "events"} <= tables


def test_reopening_keeps_version_and_data(db_path: Path, stores: Callable[..., SqliteStore]) -> None:
    first = stores(db_path)
    apply(first, success(cp(1)))
    first.close()
    before = snapshot(db_path)
    again = stores(db_path)
    assert again.schema_version == SCHEMA_VERSION
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert snapshot(db_path) == before


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
                db.execute(statement)
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
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert apply(store, PollUnchanged("h1")).events == ()
    assert apply(store, success(cp(1)), now=T0 + 1).events == ()  # the old baseline holds
    assert types(apply(store, success(cp(1), cp(2)), now=T0 + 2)) == [CHECKPOINT_CREATED]


@pytest.mark.parametrize("readonly", [False, True])
def test_database_from_a_newer_version_is_refused(
    db_path: Path, stores: Callable[..., SqliteStore], readonly: bool
) -> None:
    stores(db_path).close()
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer"):
        if readonly:
            open_store(db_path, readonly=True)
        else:
            SqliteStore(db_path)
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION + 1,)]


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


def test_readonly_store_reads_but_never_writes(db_path: Path, store: SqliteStore) -> None:
    apply(store, success(cp(1)))
    created = apply(store, success(cp(1), cp(2)), now=T0 + 1)
    before = snapshot(db_path)
    reader = open_store(db_path, readonly=True)
    try:
        assert reader.recent_events() == list(created.events)
        assert [s.latest_step for s in reader.statuses()] == [2]
        dry = reader.apply_poll(REF, success(cp(1), cp(2), cp(3)), options=OPTIONS, now=T0 + 2, commit=False)
        assert dry is not None and types(dry) == [CHECKPOINT_CREATED]
        with pytest.raises(StoreError):
            reader.apply_poll(REF, success(cp(1), cp(2), cp(3)), options=OPTIONS, now=T0 + 2)
    finally:
        reader.close()
    assert snapshot(db_path) == before


# --- apply_poll ---------------------------------------------------------------------------------------


def test_first_poll_is_a_silent_baseline_then_changes_are_announced(db_path: Path, store: SqliteStore) -> None:
    baseline = apply(store, success(cp(1), cp(2)))
    assert baseline.events == ()
    assert baseline.state.baselined
    assert sorted(baseline.state.checkpoints) == [1, 2]

    created = apply(store, success(cp(1), cp(2), cp(3, loss=0.01)), now=T0 + 10)
    assert types(created) == [CHECKPOINT_CREATED]
    [event] = created.events
    assert event.data["checkpoint"] == cp(3, loss=0.01)
    assert event.data["fine_tune"] == REF.as_data()
    assert event.fine_tune_key == REF.key
    assert event.timestamp.endswith("Z")
    assert sorted(created.state.checkpoints) == [1, 2, 3]
    # the committed events are exactly what the store returns later
    assert store.recent_events() == list(created.events)
    assert [e for _, e in store.events_after(0)] == list(created.events)
    assert event_rows(db_path) == [(event.id, CHECKPOINT_CREATED, REF.key)]


def test_returned_state_is_the_committed_state(db_path: Path, store: SqliteStore, stores: Any) -> None:
    apply(store, success(cp(1)))
    committed = apply(store, success(cp(1), cp(2, status="ACTIVE")), now=T0 + 1)
    fresh = stores(db_path)
    assert fresh.load_state(REF.key) == committed.state
    assert committed.state.body_hash == success(cp(1), cp(2, status="ACTIVE")).body_hash


def test_updates_deployments_and_removals(store: SqliteStore) -> None:
    apply(store, success(cp(1), cp(2), cp(3)))
    changed = apply(
        store, success(cp(1, loss=0.123), cp(2, status="DEPLOYING")), now=T0 + 1
    )  # step 1 updated, step 2 deployed, step 3 gone
    assert sorted(types(changed)) == sorted([CHECKPOINT_UPDATED, CHECKPOINT_DEPLOYMENT_CHANGED, CHECKPOINT_REMOVED])
    assert sorted(changed.state.checkpoints) == [1, 2]


def test_state_and_events_commit_in_one_transaction(db_path: Path, stores: Callable[..., SqliteStore]) -> None:
    ids = iter(["evt_a", "evt_b", "evt_dup", "evt_dup", "evt_c", "evt_d"])
    store = stores(db_path, new_id=lambda: next(ids))
    apply(store, success(cp(1)))
    apply(store, success(cp(1), cp(2)), now=T0 + 1)  # evt_a
    assert [row[0] for row in event_rows(db_path)] == ["evt_a"]
    apply(store, success(cp(1), cp(2), cp(3)), now=T0 + 2)  # evt_b
    before = snapshot(db_path)

    # two new checkpoints, two events with the same id: the second event insert fails
    poll = success(cp(1), cp(2), cp(3), cp(4), cp(5))
    with pytest.raises(StoreError):
        store.apply_poll(REF, poll, options=OPTIONS, now=T0 + 3)
    assert snapshot(db_path) == before  # no state, no checkpoint row, no event of that poll

    # the state did not move on: the same poll announces both checkpoints (in memory and on disk)
    retried = apply(store, poll, now=T0 + 4)
    assert [(e.id, e.type, e.data["checkpoint"]["step"]) for e in retried.events] == [
        ("evt_c", CHECKPOINT_CREATED, 4),
        ("evt_d", CHECKPOINT_CREATED, 5),
    ]
    assert [row[0] for row in event_rows(db_path)] == ["evt_a", "evt_b", "evt_c", "evt_d"]


def test_event_id_clash_with_a_committed_event_rolls_back_the_state(
    db_path: Path, stores: Callable[..., SqliteStore]
) -> None:
    ids = iter(["evt_same", "evt_same"])
    store = stores(db_path, new_id=lambda: next(ids))
    apply(store, success(cp(1)))
    apply(store, success(cp(1), cp(2)), now=T0 + 1)
    apply(store, failed(), now=T0 + 2)
    before = snapshot(db_path)
    with pytest.raises(StoreError):
        store.apply_poll(REF, success(cp(1), cp(2), cp(3)), options=OPTIONS, now=T0 + 3)
    assert snapshot(db_path) == before
    fresh = stores(db_path, new_id=counter_ids("evt_new"))
    assert sorted(fresh.load_state(REF.key).checkpoints) == [1, 2]
    assert fresh.load_state(REF.key).consecutive_failures == 1
    again = apply(fresh, success(cp(1), cp(2), cp(3)), now=T0 + 4)
    assert types(again) == [CHECKPOINT_CREATED]


def test_poll_unchanged_with_another_hash_returns_none_and_writes_nothing(db_path: Path, store: SqliteStore) -> None:
    apply(store, success(cp(1)))
    before = snapshot(db_path)
    assert store.apply_poll(REF, PollUnchanged("not-the-stored-hash"), options=OPTIONS, now=T0 + 1) is None
    assert store.apply_poll(OTHER, PollUnchanged("never-seen"), options=OPTIONS, now=T0 + 1) is None
    assert snapshot(db_path) == before


def test_poll_unchanged_with_the_stored_hash_commits_a_quiet_poll(db_path: Path, store: SqliteStore) -> None:
    poll = success(cp(1), cp(2))
    apply(store, poll)
    committed = apply(store, PollUnchanged(poll.body_hash), now=T0 + 5)
    assert committed.events == ()
    assert sorted(committed.state.checkpoints) == [1, 2]
    [status] = store.statuses()
    assert (status.last_poll_at, status.last_outcome, status.last_success_at) == (T0 + 5, "ok", T0 + 5)


def test_commit_false_writes_nothing(db_path: Path, store: SqliteStore) -> None:
    apply(store, success(cp(1)))
    before = snapshot(db_path)
    dry = store.apply_poll(REF, success(cp(1), cp(2)), options=OPTIONS, now=T0 + 1, commit=False)
    assert dry is not None and types(dry) == [CHECKPOINT_CREATED]
    dry_new = store.apply_poll(OTHER, PollNotFound(), options=OPTIONS, now=T0 + 1, commit=False)
    assert dry_new is not None and types(dry_new) == [FINE_TUNE_NOT_FOUND]
    assert store.apply_poll(REF, failed(retry_after_s=60), options=OPTIONS, now=T0 + 1, commit=False) is not None
    assert snapshot(db_path) == before
    assert store.not_before(REF.key) is None
    # nothing moved on: the real poll still announces the checkpoint
    assert types(apply(store, success(cp(1), cp(2)), now=T0 + 2)) == [CHECKPOINT_CREATED]


def test_a_poll_without_change_writes_no_checkpoint_rows(db_path: Path, store: SqliteStore) -> None:
    checkpoints = [cp(1), cp(2, status="ACTIVE"), cp(3, inference_samples=[{"text": "x" * 500}])]
    first = success(*checkpoints)
    apply(store, first)
    apply(store, success(*checkpoints[:2]), now=T0 + 1)
    apply(store, first, now=T0 + 2)
    writes = install_write_counter(db_path)
    rows_before = snapshot(db_path)["checkpoints"]

    # same checkpoints in a different body (another hash, another order), unchanged, failed, 404-free
    assert apply(store, success(*reversed(checkpoints), salt="other body"), now=T0 + 3).events == ()
    assert apply(store, PollUnchanged(store.load_state(REF.key).body_hash or ""), now=T0 + 4).events == ()
    assert apply(store, failed(), now=T0 + 5).events == ()
    assert apply(store, success(*checkpoints), now=T0 + 6).events == ()
    assert writes() == {}
    assert snapshot(db_path)["checkpoints"] == rows_before

    # a real change writes only the rows that changed
    changed = success(cp(1), cp(2, status="INACTIVE"), cp(4))  # 2 updated, 3 deleted, 4 inserted
    assert sorted(types(apply(store, changed, now=T0 + 7))) == sorted(
        [CHECKPOINT_DEPLOYMENT_CHANGED, CHECKPOINT_REMOVED, CHECKPOINT_CREATED]
    )
    assert writes() == {"insert": 1, "update": 1, "delete": 1}


def test_a_failed_poll_never_changes_known_checkpoints(db_path: Path, store: SqliteStore) -> None:
    apply(store, success(cp(1), cp(2)))
    rows = snapshot(db_path)["checkpoints"]
    for i, result in enumerate([failed(503), failed(401, outcome="unauthorized"), failed(None)]):
        apply(store, result, now=T0 + 1 + i)
    assert snapshot(db_path)["checkpoints"] == rows
    assert sorted(store.load_state(REF.key).checkpoints) == [1, 2]


def test_two_stores_on_one_file_announce_a_change_once(db_path: Path, stores: Callable[..., SqliteStore]) -> None:
    a = stores(db_path, new_id=counter_ids("evt_a"))
    b = stores(db_path, new_id=counter_ids("evt_b"))
    apply(a, success(cp(1)))
    apply(b, PollNotFound(), ref=OTHER)
    checkpoints = [cp(1)]
    for round_number in range(2, 22):
        checkpoints.append(cp(round_number))
        poll = success(*checkpoints)
        barrier = threading.Barrier(2)
        results: dict[str, Committed | BaseException | None] = {}

        def run(name: str, store: SqliteStore, poll: PollSuccess = poll) -> None:
            barrier.wait()
            try:
                results[name] = store.apply_poll(REF, poll, options=OPTIONS, now=T0 + round_number)
            except BaseException as err:
                results[name] = err

        threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("a", a), ("b", b))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert all(isinstance(r, Committed) for r in results.values()), results
        announced = [e for r in results.values() if isinstance(r, Committed) for e in r.events]
        assert [(e.type, e.data["checkpoint"]["step"]) for e in announced] == [(CHECKPOINT_CREATED, round_number)]
    rows = event_rows(db_path)
    created = [row for row in rows if row[1] == CHECKPOINT_CREATED]
    assert len(created) == 20
    assert len({row[0] for row in rows}) == len(rows)


# --- reports ------------------------------------------------------------------------------------------


def build_history(store: SqliteStore) -> None:
    apply(store, success(cp(1)), now=T0)
    apply(store, success(cp(1), cp(2)), now=T0 + 1)  # created 2
    apply(store, success(cp(1), cp(2, status="ACTIVE")), now=T0 + 2)  # deployment_changed 2
    apply(store, success(cp(2, status="ACTIVE")), now=T0 + 3)  # removed 1
    apply(store, PollNotFound(), ref=OTHER, now=T0 + 4)  # not_found (other)
    apply(store, success(cp(2, status="ACTIVE"), cp(3)), now=T0 + 5)  # created 3


def test_recent_events_newest_first_with_limit_and_glob(store: SqliteStore) -> None:
    build_history(store)
    all_types = [
        CHECKPOINT_CREATED,
        FINE_TUNE_NOT_FOUND,
        CHECKPOINT_REMOVED,
        CHECKPOINT_DEPLOYMENT_CHANGED,
        CHECKPOINT_CREATED,
    ]
    recent = store.recent_events()
    assert [e.type for e in recent] == all_types
    assert [e.timestamp for e in recent] == sorted((e.timestamp for e in recent), reverse=True)
    assert [e.type for e in store.recent_events(limit=2)] == all_types[:2]
    assert [e.type for e in store.recent_events(limit=1)] == all_types[:1]
    created = store.recent_events(type_glob="checkpoint.created")
    assert [e.data["checkpoint"]["step"] for e in created] == [3, 2]
    assert [e.type for e in store.recent_events(type_glob="checkpoint.*")] == [
        t for t in all_types if t.startswith("checkpoint.")
    ]
    assert [e.fine_tune_key for e in store.recent_events(type_glob="fine_tune.*")] == [OTHER.key]
    assert [e.type for e in store.recent_events(type_glob="checkpoint.*", limit=2)] == [
        CHECKPOINT_CREATED,
        CHECKPOINT_REMOVED,
    ]
    assert store.recent_events(type_glob="nothing.*") == []
    assert store.recent_events(type_glob="CHECKPOINT.*") == []  # types match case-sensitively


def test_recent_events_limit_zero_returns_nothing(store: SqliteStore) -> None:
    build_history(store)
    assert store.recent_events(limit=0) == []


def test_events_after_is_oldest_first_and_exclusive(store: SqliteStore) -> None:
    build_history(store)
    everything = store.events_after(0)
    seqs = [seq for seq, _ in everything]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) == 5
    assert [e for _, e in everything] == list(reversed(store.recent_events()))
    assert store.events_after(seqs[1]) == everything[2:]
    assert store.events_after(seqs[-1]) == []
    assert store.events_after(0, limit=2) == everything[:2]
    new = apply(store, success(cp(2, status="ACTIVE"), cp(3), cp(4)), now=T0 + 9)
    assert [e for _, e in store.events_after(seqs[-1])] == list(new.events)


def test_statuses(store: SqliteStore) -> None:
    options = DiffOptions(failure_threshold=2)
    apply(store, success(cp(1, loss=0.9), cp(5, loss=0.4, status="ACTIVE"), cp(3, status="deploying")), now=T0)
    apply(store, PollNotFound(), ref=OTHER, now=T0 + 1)
    unknown = "ox/models/ft_unknown"

    ok, not_found, never = store.statuses([REF.key, OTHER.key, unknown])
    assert [s.key for s in store.statuses()] == sorted([REF.key, OTHER.key])
    assert (ok.key, ok.last_poll_at, ok.last_outcome, ok.last_http_status, ok.last_error) == (
        REF.key,
        T0,
        "ok",
        200,
        None,
    )
    assert (ok.baselined, ok.not_found, ok.failing, ok.consecutive_failures) == (True, False, False, 0)
    assert (ok.checkpoints, ok.latest_step, ok.latest_loss, ok.last_success_at) == (3, 5, 0.4, T0)
    assert ok.latest_created_at == cp(5)["created_at"]
    assert ok.deployments == {3: "deploying", 5: "ACTIVE"}
    assert ok.metrics["loss"] == 0.4 and ok.metrics["learning_rate"] == 1e-5
    assert (not_found.not_found, not_found.last_outcome, not_found.last_http_status, not_found.checkpoints) == (
        True,
        "not_found",
        404,
        0,
    )
    assert (never.key, never.last_poll_at, never.baselined, never.checkpoints, never.latest_step) == (
        unknown,
        None,
        False,
        0,
        None,
    )

    first = apply(store, failed(502), now=T0 + 10, options=options)
    second = apply(store, failed(503), now=T0 + 20, options=options)
    third = apply(store, failed(503), now=T0 + 30, options=options)
    assert (types(first), types(second), types(third)) == ([], [FINE_TUNE_POLL_FAILING], [])
    [status] = store.statuses([REF.key])
    assert (status.consecutive_failures, status.failing, status.last_outcome, status.last_http_status) == (
        3,
        True,
        "error",
        503,
    )
    assert status.last_error == "Hub answered 503"
    assert (status.last_poll_at, status.last_success_at) == (T0 + 30, T0)
    assert status.checkpoints == 3  # failures keep what is known

    recovered = apply(
        store,
        success(cp(1, loss=0.9), cp(5, loss=0.4, status="ACTIVE"), cp(3, status="deploying")),
        now=T0 + 40,
        options=options,
    )
    assert types(recovered) == [FINE_TUNE_POLL_RECOVERED]
    [status] = store.statuses([REF.key])
    assert (status.consecutive_failures, status.failing, status.last_error, status.last_success_at) == (
        0,
        False,
        None,
        T0 + 40,
    )


def test_not_found_is_announced_on_the_transition_only(store: SqliteStore) -> None:
    assert types(apply(store, PollNotFound())) == [FINE_TUNE_NOT_FOUND]
    assert types(apply(store, PollNotFound(), now=T0 + 1)) == []
    back = apply(store, success(cp(1)), now=T0 + 2)
    assert back.events == () and back.state.not_found is False  # the first answer is still the baseline
    assert types(apply(store, PollNotFound(), now=T0 + 3)) == [FINE_TUNE_NOT_FOUND]


def test_not_before_is_persisted_from_retry_after(
    db_path: Path, store: SqliteStore, stores: Callable[..., SqliteStore]
) -> None:
    apply(store, success(cp(1)))
    apply(store, failed(429, retry_after_s=120.0), now=T0 + 10)
    assert store.not_before(REF.key) == T0 + 130
    assert store.statuses([REF.key])[0].not_before == T0 + 130
    store.close()

    restarted = stores(db_path)
    assert restarted.not_before(REF.key) == T0 + 130
    assert restarted.statuses([REF.key])[0].not_before == T0 + 130
    assert open_store(db_path, readonly=True).not_before(REF.key) == T0 + 130

    apply(restarted, failed(503), now=T0 + 200)  # a failure without Retry-After holds nothing back
    assert restarted.not_before(REF.key) is None
    apply(restarted, failed(503, retry_after_s=30.0), now=T0 + 300)
    assert restarted.not_before(REF.key) == T0 + 330
    apply(restarted, success(cp(1)), now=T0 + 400)  # an answer clears it
    assert restarted.not_before(REF.key) is None
    assert restarted.not_before("ox/models/never") is None


def test_restart_keeps_the_baseline(db_path: Path, stores: Callable[..., SqliteStore]) -> None:
    first = stores(db_path, new_id=counter_ids("evt_1_"))
    poll = success(cp(1), cp(2, status="ACTIVE"))
    assert apply(first, poll).events == ()
    apply(first, PollNotFound(), ref=OTHER)
    first.close()
    events_before = event_rows(db_path)

    second = stores(db_path, new_id=counter_ids("evt_2_"))
    assert apply(second, poll, now=T0 + 1).events == ()  # no re-announcement
    other_body = success(cp(2, status="ACTIVE"), cp(1), salt="x")
    assert apply(second, other_body, now=T0 + 2).events == ()
    assert apply(second, PollUnchanged(other_body.body_hash), now=T0 + 3).events == ()
    assert apply(second, PollNotFound(), ref=OTHER, now=T0 + 3).events == ()  # still not found: no repeat
    assert event_rows(db_path) == events_before
    later = apply(second, success(cp(1), cp(2, status="ACTIVE"), cp(3)), now=T0 + 4)
    assert [(e.type, e.data["checkpoint"]["step"]) for e in later.events] == [(CHECKPOINT_CREATED, 3)]


def test_fine_tunes_are_independent(store: SqliteStore) -> None:
    apply(store, success(cp(1)))
    assert apply(store, success(cp(1)), ref=OTHER).events == ()  # OTHER's own baseline
    assert types(apply(store, success(cp(1), cp(2)), ref=OTHER, now=T0 + 1)) == [CHECKPOINT_CREATED]
    assert sorted(store.load_state(REF.key).checkpoints) == [1]
    assert [s.latest_step for s in store.statuses([REF.key, OTHER.key])] == [1, 2]


def test_restart_remembers_the_last_body_hash(db_path: Path, stores: Callable[..., SqliteStore]) -> None:
    first = stores(db_path)
    poll = success(cp(1), cp(2))
    apply(first, poll)
    first.close()
    second = stores(db_path)
    assert second.apply_poll(REF, PollUnchanged("some-other-hash"), options=OPTIONS, now=T0 + 1) is None
    quiet = apply(second, PollUnchanged(poll.body_hash), now=T0 + 1)
    assert quiet.events == () and quiet.state.body_hash == poll.body_hash
    assert sorted(quiet.state.checkpoints) == [1, 2]


def test_readonly_sqlite_store_on_a_missing_file_fails_without_creating_it(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    with pytest.raises(StoreError):
        SqliteStore(path, readonly=True)
    assert not path.exists()
