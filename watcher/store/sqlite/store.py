"""The SQLite store: WAL, versioned schema, portable SQL.

State and the events it yields commit in one transaction: an event exists exactly when the state that
produced it does, whatever crashes in between.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import structlog

from watcher.core.diff import DiffOptions, diff
from watcher.core.events import stamp
from watcher.core.models import (
    Event,
    FineTuneRef,
    FineTuneState,
    KnownCheckpoint,
    PollFailed,
    PollResult,
    PollSuccess,
    PollUnchanged,
    outcome_of,
)
from watcher.errors import StoreError
from watcher.store.pages import summary_of_checkpoints, summary_row, summary_upsert
from watcher.store.protocols import Committed, Router
from watcher.store.reads import SharedReads
from watcher.store.replicas import Fence
from watcher.store.sqlite.lifecycle import SqliteLifecycle
from watcher.store.sqlite.migrate import CONVERT_AT_START_MAX_BYTES, SqliteMigrations
from watcher.store.sqlite.outbox import SqliteOutbox
from watcher.store.sqlite.prune import SqlitePrune
from watcher.store.sqlite.reads import SqliteReads
from watcher.store.touches import TouchCache

log = structlog.get_logger("watcher.store")

# The WAL file is cut back to this size after a checkpoint, so a burst (a large prune) does not leave it big.
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024


class SqliteStore(SqliteMigrations, SqliteReads, SqliteOutbox, SqlitePrune, SqliteLifecycle, SharedReads, TouchCache):
    """The SQLite store: WAL mode, one writer transaction per poll, a cache of decoded state per fine-tune."""

    MARK = "?"

    def __init__(
        self,
        path: str | Path,
        *,
        readonly: bool = False,
        busy_timeout_s: float = 5.0,
        new_id: Callable[[], str] | None = None,
        convert_max_bytes: int | None = CONVERT_AT_START_MAX_BYTES,
    ) -> None:
        self.path = str(path)
        self.readonly = readonly
        self._new_id = new_id
        self._init_touches()
        try:
            if readonly:
                self._db = connect_readonly(self.path, timeout_s=busy_timeout_s)
            else:
                if self.path != ":memory:":
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(
                    self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
                )
                # before the first table (and before WAL mode writes the header): a new file frees its pages
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
                # NORMAL in WAL mode survives process crashes (kill -9); a power loss may drop the last commits,
                # so a commit that carries events is synced to disk as well (SqliteBase._commit)
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._migrate()
                self._convert_to_incremental_vacuum(max_bytes=convert_max_bytes)
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            if readonly:
                self._check_version()
        except sqlite3.Error as err:
            raise StoreError(f"cannot open state database {self.path}: {err}") from err

    # --- reads ---------------------------------------------------------------------------------------

    def _load_state(self, key: str, row: sqlite3.Row | tuple[Any, ...] | None) -> tuple[int, FineTuneState]:
        if row is None:
            return -1, FineTuneState()
        baselined, not_found, failures, failing, best_loss, body_hash, revision = row
        cached = self._cache.get(key)
        if cached is not None and cached[0] == revision:
            return cached
        checkpoints = {
            step: KnownCheckpoint(step=step, fingerprint=fp, data=orjson.loads(data))
            for step, fp, data in self._db.execute(
                "SELECT step, fingerprint, data FROM checkpoints WHERE fine_tune_key = ? ORDER BY step", (key,)
            )
        }
        state = FineTuneState(
            baselined=bool(baselined),
            not_found=bool(not_found),
            consecutive_failures=failures,
            failing=bool(failing),
            best_loss=best_loss,
            body_hash=body_hash,
            checkpoints=checkpoints,
        )
        self._cache[key] = (revision, state)
        return revision, state

    def _state_row(self, key: str) -> tuple[Any, ...] | None:
        return self._db.execute(
            "SELECT baselined, not_found, consecutive_failures, failing, best_loss, body_hash, revision "
            "FROM fine_tunes WHERE fine_tune_key = ?",
            (key,),
        ).fetchone()

    def _committed_checkpoints(self, key: str) -> Mapping[int, KnownCheckpoint] | None:
        state = self._load_state(key, self._state_row(key))[1]
        return state.checkpoints if state.baselined else None  # None: no 200 committed yet

    def load_state(self, key: str) -> FineTuneState:
        """The committed state of one fine-tune (an empty state when never seen)."""
        try:
            return self._load_state(key, self._state_row(key))[1]
        except sqlite3.Error as err:
            raise StoreError(f"cannot read state: {err}") from err

    def not_before(self, key: str) -> float | None:
        """The Unix time before which the Hub asked not to be polled for this fine-tune."""
        try:
            row = self._db.execute("SELECT not_before FROM fine_tunes WHERE fine_tune_key = ?", (key,)).fetchone()
        except sqlite3.Error as err:
            raise StoreError(f"cannot read state: {err}") from err
        return row[0] if row else None

    # --- the one write path ---------------------------------------------------------------------

    def apply_poll(
        self,
        ref: FineTuneRef,
        result: PollResult,
        *,
        options: DiffOptions,
        now: float,
        commit: bool = True,
        route: Router | None = None,
        fence: Fence | None = None,
    ) -> Committed | None:
        """Diff a poll result against the stored state and commit state, events and outbox in one transaction.

        `route` names the notifiers each event goes to; an outbox row is created for each. Returns None when
        `result` is PollUnchanged but another writer has moved the state on since this process last saw it:
        the caller parses the body and applies a PollSuccess instead.
        With commit=False (a dry run) nothing is written. `fence` is for stores that replicas share: one process
        owns a SQLite database whole, so there is no lease to check.
        """
        key = ref.key
        if commit:
            self._drop_touch(key, now)
        try:
            # IMMEDIATE takes the write lock before reading, so two processes polling the same fine-tune
            # (`once` beside `run`) serialize and never announce one change twice.
            self._db.execute("BEGIN IMMEDIATE" if commit else "BEGIN")
            self._events_written = False
            try:
                row = self._state_row(key)
                revision, old = self._load_state(key, row)
                if isinstance(result, PollUnchanged) and old.body_hash != result.body_hash:
                    self._db.execute("ROLLBACK")
                    return None
                transition = diff(ref, old, result, options=options)
                events = tuple(
                    stamp(
                        draft,
                        fine_tune_key=key,
                        now=now,
                        event_id=self._new_id() if self._new_id else None,
                    )
                    for draft in transition.events
                )
                if not commit:
                    self._db.execute("ROLLBACK")
                    return Committed(events, transition.state)  # the cache keeps the committed state
                self._write(key, row is None, revision, result, transition.state, now)
                if transition.upserts:
                    self._db.executemany(
                        "INSERT INTO checkpoints (fine_tune_key, step, fingerprint, data) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (fine_tune_key, step) DO UPDATE "
                        "SET fingerprint = excluded.fingerprint, data = excluded.data",
                        [(key, c.step, c.fingerprint, orjson.dumps(c.data).decode()) for c in transition.upserts],
                    )
                if transition.deletes:
                    self._db.executemany(
                        "DELETE FROM checkpoints WHERE fine_tune_key = ? AND step = ?",
                        [(key, step) for step in transition.deletes],
                    )
                if transition.upserts or transition.deletes:  # the status page's summary, in the same commit
                    self._db.execute(summary_upsert("?"), summary_row(key, _summary(transition.state)))
                self._insert_events(events, now=now, route=route)
                self._commit()
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._cache.pop(key, None)
                raise
        except sqlite3.Error as err:
            raise StoreError(f"cannot commit poll of {key}: {err}") from err
        self._cache[key] = (revision + 1 if row is not None else 0, transition.state)
        return Committed(events, transition.state, bool(transition.upserts or transition.deletes))

    def _insert_events(self, events: Sequence[Event], *, now: float, route: Router | None) -> None:
        self._events_written = self._events_written or bool(events)
        batch_id = events[0].id if events else ""
        for event in events:
            cursor = self._db.execute(
                "INSERT INTO events (id, type, fine_tune_key, created_at, envelope) VALUES (?, ?, ?, ?, ?)",
                (event.id, event.type, event.fine_tune_key, now, orjson.dumps(event.envelope()).decode()),
            )
            seq = cursor.lastrowid
            for notifier in route(event) if route else ():
                self._db.execute(
                    "INSERT INTO deliveries (event_seq, event_id, notifier, fine_tune_key, batch_id, state, "
                    "attempts, next_attempt_at, queued_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
                    (seq, event.id, notifier, event.fine_tune_key, batch_id, now, now),
                )

    def _write(self, key: str, new: bool, revision: int, result: PollResult, state: FineTuneState, now: float) -> None:
        answered_200 = isinstance(result, PollSuccess | PollUnchanged)  # last_success_at: the last 200
        error = result.error if isinstance(result, PollFailed) else None
        retry_after_s = result.retry_after_s if isinstance(result, PollFailed) else None
        not_before = now + retry_after_s if retry_after_s else None
        values = (
            int(state.baselined),
            int(state.not_found),
            state.consecutive_failures,
            int(state.failing),
            state.best_loss,
            state.body_hash,
            not_before,
            now,
            outcome_of(result),
            error,
            result.http_status,
        )
        if new:
            self._db.execute(
                "INSERT INTO fine_tunes (baselined, not_found, consecutive_failures, failing, best_loss, body_hash, "
                "not_before, last_poll_at, last_outcome, last_error, last_http_status, last_success_at, revision, "
                "fine_tune_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (*values, now if answered_200 else None, key),
            )
        else:
            self._db.execute(
                "UPDATE fine_tunes SET baselined = ?, not_found = ?, consecutive_failures = ?, failing = ?, "
                "best_loss = ?, body_hash = ?, not_before = ?, last_poll_at = ?, last_outcome = ?, last_error = ?, "
                "last_http_status = ?, last_success_at = CASE WHEN ? THEN last_success_at ELSE ? END, "
                "revision = ? WHERE fine_tune_key = ?",
                (*values, int(not answered_200), now, revision + 1, key),
            )

    def close(self) -> None:
        """Release the database."""
        self._close_wal()
        self._db.close()


def _summary(state: FineTuneState) -> dict[str, Any]:
    return summary_of_checkpoints({step: known.data for step, known in state.checkpoints.items()})


def connect_readonly(path: str | Path, *, timeout_s: float) -> sqlite3.Connection:
    """A read-only connection to a state database, also on a read-only mount or in a folder this user cannot
    write (a backup, a container volume, an operator without write rights)."""
    resolved = Path(path).resolve()
    db = sqlite3.connect(
        f"file:{resolved}?mode=ro", uri=True, timeout=timeout_s, isolation_level=None, check_same_thread=False
    )
    try:
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError as err:
        db.close()
        if err.sqlite_errorcode != sqlite3.SQLITE_CANTOPEN:  # busy, corrupt, ...: not a matter of the -shm file
            raise
    # A reader of a WAL database needs its -shm file, and cannot create it where nothing can be written ("unable
    # to open database file"). Nothing writes the file there either (a writer would have made the -shm file), so
    # it is read as immutable: no locks, no -shm, no WAL.
    return sqlite3.connect(
        f"file:{resolved}?immutable=1", uri=True, timeout=timeout_s, isolation_level=None, check_same_thread=False
    )


def open_store(path: str | Path, *, readonly: bool = False) -> SqliteStore:
    """Open the state database; readonly with no file yet gives an empty in-memory state."""
    if readonly and not Path(path).exists():
        return SqliteStore(":memory:")
    return SqliteStore(path, readonly=readonly)


def wall_clock() -> float:
    """The default clock: Unix seconds."""
    return time.time()
