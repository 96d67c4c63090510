"""The SQLite store: WAL, versioned schema, portable SQL.

State and the events it yields commit in one transaction: an event exists exactly when the state that
produced it does, whatever crashes in between.
"""

from __future__ import annotations

import fnmatch
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ..diff import DiffOptions, diff
from ..errors import StoreError
from ..events import stamp
from ..models import (
    Delivery,
    Event,
    FineTuneRef,
    FineTuneState,
    FineTuneStatus,
    KnownCheckpoint,
    OutboxStats,
    PollFailed,
    PollResult,
    PollSuccess,
    PollUnchanged,
    metric_of,
    outcome_of,
)
from .protocols import Committed, Router
from .schema_sqlite import MIGRATIONS, SCHEMA_VERSION

T = TypeVar("T")


def _event_from_row(envelope: str, fine_tune_key: str) -> Event:
    doc = orjson.loads(envelope)
    return Event(doc["id"], doc["type"], doc["timestamp"], doc["data"], fine_tune_key)


_DELIVERY_COLUMNS = (
    "event_seq, event_id, notifier, fine_tune_key, batch_id, state, attempts, next_attempt_at, queued_at, "
    "last_error, last_status"
)


class SqliteStore:
    """The SQLite store: WAL mode, one writer transaction per poll, a cache of decoded state per fine-tune."""

    def __init__(
        self,
        path: str | Path,
        *,
        readonly: bool = False,
        busy_timeout_s: float = 5.0,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self.path = str(path)
        self.readonly = readonly
        self._new_id = new_id
        # fine_tune_key -> (revision, state) as last read or written by this process
        self._cache: dict[str, tuple[int, FineTuneState]] = {}
        try:
            if readonly:
                uri = f"file:{Path(self.path).resolve()}?mode=ro"
                self._db = sqlite3.connect(
                    uri, uri=True, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
                )
            else:
                if self.path != ":memory:":
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(
                    self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
                )
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode survives process crashes (kill -9); only power loss may drop the last commits.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._migrate()
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            if readonly:
                self._check_version()
        except sqlite3.Error as err:
            raise StoreError(f"cannot open state database {self.path}: {err}") from err

    # --- schema ----------------------------------------------------------------------------------

    def _version(self) -> int:
        exists = self._db.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()[0]
        if not exists:
            return 0
        row = self._db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _check_version(self) -> None:
        version = self._version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"state database {self.path} has schema version {version}, newer than this release "
                f"({SCHEMA_VERSION}): upgrade oxen-watcher"
            )

    def _migrate(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = self._version()
            self._check_version()
            if not self._db.execute("SELECT 1 FROM schema_version").fetchone():
                self._db.execute("INSERT INTO schema_version (version) VALUES (0)")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    self._db.execute(statement)
            self._db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        return self._version()

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

    def load_state(self, key: str) -> FineTuneState:
        """The committed state of one fine-tune (an empty state when never seen)."""
        try:
            return self._load_state(key, self._state_row(key))[1]
        except sqlite3.Error as err:
            raise StoreError(f"cannot read state: {err}") from err

    def body_hash(self, key: str) -> str | None:
        """The hash of the last committed 200 body of a fine-tune."""
        cached = self._cache.get(key)
        return cached[1].body_hash if cached else None

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
    ) -> Committed | None:
        """Diff a poll result against the stored state and commit state, events and outbox in one transaction.

        `route` names the notifiers each event goes to; an outbox row is created for each. Returns None when
        `result` is PollUnchanged but another writer has moved the state on since this process last saw it:
        the caller parses the body and applies a PollSuccess instead.
        With commit=False (a dry run) nothing is written.
        """
        key = ref.key
        try:
            # IMMEDIATE takes the write lock before reading, so two processes polling the same fine-tune
            # (`once` beside `run`) serialize and never announce one change twice.
            self._db.execute("BEGIN IMMEDIATE" if commit else "BEGIN")
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
                self._insert_events(events, now=now, route=route)
                self._db.execute("COMMIT")
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

    def load_cached(self, key: str) -> FineTuneState:
        """The state of a fine-tune as this process last committed or read it (no I/O)."""
        cached = self._cache.get(key)
        return cached[1] if cached else FineTuneState()

    def quiet(self, key: str, body_hash: str) -> bool:
        """Whether a 200 with this body hash would change nothing but the poll times (a `touch` suffices)."""
        cached = self._cache.get(key)
        if cached is None:
            return False
        state = cached[1]
        return state.body_hash == body_hash and not (state.consecutive_failures or state.failing or state.not_found)

    def touch(self, polls: Sequence[tuple[str, str, float]]) -> list[str]:
        """Record unchanged 200 polls (key, body hash, time) in one transaction. Rows another writer has moved
        on since (another body, a newer revision) are left alone; their keys are returned."""
        if not polls:
            return []

        def write() -> list[str]:
            moved_on = []
            for key, digest, at in polls:
                cached = self._cache.get(key)
                updated = self._db.execute(
                    "UPDATE fine_tunes SET last_poll_at = ?, last_success_at = ?, last_outcome = 'ok', "
                    "last_error = NULL, last_http_status = 200, not_before = NULL "
                    "WHERE fine_tune_key = ? AND body_hash = ? AND revision = ?",
                    (at, at, key, digest, cached[0] if cached else -1),
                ).rowcount
                if not updated:
                    moved_on.append(key)
            return moved_on

        return self._write_tx(write, what="record poll times")

    def forget(self, key: str) -> None:
        """Drop what this process caches of a fine-tune: the next poll reads the state from the database."""
        self._cache.pop(key, None)

    # --- reports ---------------------------------------------------------------------------------

    def statuses(self, keys: Sequence[str] | None = None) -> list[FineTuneStatus]:
        """Per fine-tune status (those in `keys`, in that order, or all), for `status` and metrics."""
        try:
            rows = {
                row[0]: row
                for row in self._db.execute(
                    "SELECT fine_tune_key, last_poll_at, last_outcome, last_error, last_http_status, "
                    "last_success_at, consecutive_failures, failing, not_found, baselined, not_before "
                    "FROM fine_tunes"
                )
            }
            wanted = list(keys) if keys is not None else sorted(rows)
            return [self._status(key, rows.get(key)) for key in wanted]
        except sqlite3.Error as err:
            raise StoreError(f"cannot read state: {err}") from err

    def _status(self, key: str, row: tuple[Any, ...] | None) -> FineTuneStatus:
        checkpoints = [
            (step, orjson.loads(data))
            for step, data in self._db.execute(
                "SELECT step, data FROM checkpoints WHERE fine_tune_key = ? ORDER BY step", (key,)
            )
        ]
        latest = checkpoints[-1][1] if checkpoints else {}
        metrics: dict[str, float | None] = {}
        for name in ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "epoch"):
            # the latest checkpoint that reports each metric
            metrics[name] = next(
                (v for _, data in reversed(checkpoints) if (v := metric_of(data, name)) is not None), None
            )
        deployments = {
            step: data["deployment_status"]
            for step, data in checkpoints
            if isinstance(data.get("deployment_status"), str)
        }
        values = row[1:] if row else (None, None, None, None, None, 0, 0, 0, 0, None)
        return FineTuneStatus(
            key=key,
            last_poll_at=values[0],
            last_outcome=values[1],
            last_error=values[2],
            last_http_status=values[3],
            last_success_at=values[4],
            consecutive_failures=values[5],
            failing=bool(values[6]),
            not_found=bool(values[7]),
            baselined=bool(values[8]),
            not_before=values[9],
            checkpoints=len(checkpoints),
            latest_step=checkpoints[-1][0] if checkpoints else None,
            latest_loss=metric_of(latest, "loss"),
            latest_created_at=latest.get("created_at") if isinstance(latest.get("created_at"), str) else None,
            metrics=metrics,
            deployments=deployments,
        )

    def recent_events(self, *, limit: int = 50, type_glob: str | None = None) -> list[Event]:
        """Committed events, newest first, optionally only those whose type matches a glob."""
        found: list[Event] = []
        if limit <= 0:
            return found
        try:
            cursor = self._db.execute("SELECT envelope, fine_tune_key, type FROM events ORDER BY seq DESC")
            for envelope, key, kind in cursor:
                if type_glob is None or fnmatch.fnmatchcase(kind, type_glob):
                    found.append(_event_from_row(envelope, key))
                    if len(found) >= limit:
                        break
            cursor.close()
        except sqlite3.Error as err:
            raise StoreError(f"cannot read events: {err}") from err
        return found

    def events_after(self, seq: int, *, limit: int = 1000) -> list[tuple[int, Event]]:
        """Committed events with a sequence number above `seq`, oldest first."""
        try:
            rows = self._db.execute(
                "SELECT seq, envelope, fine_tune_key FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            ).fetchall()
        except sqlite3.Error as err:
            raise StoreError(f"cannot read events: {err}") from err
        return [(s, _event_from_row(envelope, key)) for s, envelope, key in rows]

    # --- the outbox ------------------------------------------------------------------------------------

    def _write_tx(self, fn: Callable[[], T], *, what: str = "write the outbox") -> T:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                value = fn()
                self._db.execute("COMMIT")
                return value
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise StoreError(f"cannot {what}: {err}") from err

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as err:
            raise StoreError(f"cannot read the outbox: {err}") from err

    def due_deliveries(self, notifiers: Sequence[str], *, now: float, limit: int = 500) -> list[Delivery]:
        """The head of each (notifier, fine-tune) lane, when it is due: one row per lane keeps event order.

        `limit` applies per notifier, so a slow notifier's backlog never hides another notifier's rows.
        """
        found: list[Delivery] = []
        for notifier in notifiers:
            rows = self._read(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries d WHERE d.state = 'pending' AND d.notifier = ? "
                "AND d.event_seq = (SELECT MIN(h.event_seq) FROM deliveries h WHERE h.notifier = d.notifier "
                "AND h.state = 'pending' AND h.fine_tune_key = d.fine_tune_key) "
                "AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at, d.event_seq LIMIT ?",
                (notifier, now, limit),
            )
            found += [Delivery(*row) for row in rows]
        return found

    def next_due_at(self, notifiers: Sequence[str]) -> float | None:
        """The earliest next attempt among pending rows of these notifiers."""
        if not notifiers:
            return None
        marks = ", ".join("?" for _ in notifiers)
        rows = self._read(
            f"SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'pending' AND notifier IN ({marks})",
            tuple(notifiers),
        )
        return rows[0][0] if rows else None

    def lane_batch(self, head: Delivery, *, limit: int = 1000) -> list[Delivery]:
        """The pending rows of the head's lane that came from the same poll, in event order."""
        rows = self._read(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE notifier = ? AND fine_tune_key = ? "
            "AND batch_id = ? AND state = 'pending' ORDER BY event_seq LIMIT ?",
            (head.notifier, head.fine_tune_key, head.batch_id, limit),
        )
        return [Delivery(*row) for row in rows]

    def events_by_id(self, event_ids: Sequence[str]) -> dict[str, Event]:
        """Committed events by id."""
        found: dict[str, Event] = {}
        for start in range(0, len(event_ids), 500):
            chunk = event_ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            for envelope, key in self._read(
                f"SELECT envelope, fine_tune_key FROM events WHERE id IN ({marks})", tuple(chunk)
            ):
                event = _event_from_row(envelope, key)
                found[event.id] = event
        return found

    def record_delivery(
        self,
        notifier: str,
        event_ids: Sequence[str],
        *,
        state: str,
        now: float,
        next_attempt_at: float | None = None,
        error: str | None = None,
        http_status: int | None = None,
    ) -> None:
        """Record the outcome of one attempt at delivering these events to a notifier."""

        def write() -> None:
            self._db.executemany(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, next_attempt_at = ?, last_error = ?, "
                "last_status = ?, delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END "
                "WHERE event_id = ? AND notifier = ? AND state = 'pending'",
                [
                    (state, next_attempt_at, error, http_status, state, now, event_id, notifier)
                    for event_id in event_ids
                ],
            )

        self._write_tx(write)

    def deliveries_of(self, event_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        """The outbox rows of these events, by event id."""
        found: dict[str, list[Delivery]] = {event_id: [] for event_id in event_ids}
        for start in range(0, len(event_ids), 500):
            chunk = event_ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            for row in self._read(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE event_id IN ({marks}) ORDER BY notifier",
                tuple(chunk),
            ):
                found[row[1]].append(Delivery(*row))
        return found

    def redeliver(
        self,
        *,
        now: float,
        event_ids: Sequence[str] = (),
        dead: bool = False,
        notifier: str | None = None,
        route: Router | None = None,
    ) -> int:
        """Queue events again: the dead rows (of one notifier), or the named events (to every matching
        notifier, creating rows where `route` adds one). Returns how many rows were queued."""

        def write() -> int:
            count = 0
            if dead:
                where = "state = 'dead'"
                args: list[Any] = [now, now]
                if notifier is not None:
                    where += " AND notifier = ?"
                    args.append(notifier)
                count += self._db.execute(
                    "UPDATE deliveries SET state = 'pending', next_attempt_at = ?, queued_at = ?, attempts = 0 "
                    f"WHERE {where}",
                    args,
                ).rowcount
            for event_id in event_ids:
                row = self._db.execute(
                    "SELECT seq, envelope, fine_tune_key FROM events WHERE id = ?", (event_id,)
                ).fetchone()
                if row is None:
                    raise StoreError(f"no event with id {event_id}")
                seq, envelope, key = row
                targets = list(route(_event_from_row(envelope, key))) if route else []
                if notifier is not None:
                    targets = [notifier]
                for target in targets:
                    count += self._db.execute(
                        "INSERT INTO deliveries (event_seq, event_id, notifier, fine_tune_key, batch_id, state, "
                        "attempts, next_attempt_at, queued_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?) "
                        "ON CONFLICT (event_id, notifier) DO UPDATE SET state = 'pending', attempts = 0, "
                        "next_attempt_at = excluded.next_attempt_at, queued_at = excluded.queued_at",
                        (seq, event_id, target, key, event_id, now, now),
                    ).rowcount
            return count

        return self._write_tx(write)

    def outbox_stats(self) -> list[OutboxStats]:
        """Pending rows and the oldest pending row's queue time, per notifier."""
        rows = self._read(
            "SELECT notifier, COUNT(*), MIN(queued_at) FROM deliveries WHERE state = 'pending' GROUP BY notifier"
        )
        return [OutboxStats(notifier, count, oldest) for notifier, count, oldest in rows]

    def close(self) -> None:
        """Release the database."""
        self._db.close()

    # provisional: the store branch owns this
    def retire_notifiers(self, known: Sequence[str], *, now: float, reason: str = "notifier_removed") -> int:
        """Pending rows of notifiers not in `known` become dead with `reason` as their error; returns how many."""

        def write() -> int:
            marks = ", ".join("?" for _ in known)
            where = f"state = 'pending' AND notifier NOT IN ({marks})" if known else "state = 'pending'"
            return self._db.execute(
                f"UPDATE deliveries SET state = 'dead', next_attempt_at = NULL, last_error = ? WHERE {where}",
                (reason, *known),
            ).rowcount

        return self._write_tx(write)


def open_store(path: str | Path, *, readonly: bool = False) -> SqliteStore:
    """Open the state database; readonly with no file yet gives an empty in-memory state."""
    if readonly and not Path(path).exists():
        return SqliteStore(":memory:")
    return SqliteStore(path, readonly=readonly)


def wall_clock() -> float:
    """The default clock: Unix seconds."""
    return time.time()
