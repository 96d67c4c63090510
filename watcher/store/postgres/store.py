"""The PostgreSQL store: the same behaviour as SqliteStore over a psycopg connection pool, shared by replicas.

State, events and outbox rows of one poll commit in one transaction. Where SQLite takes its write lock with
BEGIN IMMEDIATE, a poll here takes a per-fine-tune advisory lock and then the fine-tune's row with FOR UPDATE;
with a fence it also checks, inside the same transaction, that this replica still holds the fine-tune's lease at
the epoch it polled under.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
import psycopg

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
from watcher.store.postgres.base import check_fence, open_pool, store_error
from watcher.store.postgres.leases import AdvisoryGate, PostgresLeases
from watcher.store.postgres.lifecycle import PgLifecycle
from watcher.store.postgres.outbox import PgOutbox
from watcher.store.postgres.prune import PgPrune
from watcher.store.postgres.reads import PgReports
from watcher.store.postgres.schema import MIGRATION_LOCK, MIGRATIONS, SCHEMA_VERSION, SEQ_SHIFT
from watcher.store.protocols import Committed, Router, Store
from watcher.store.reads import SharedReads
from watcher.store.replicas import ReplicaStore
from watcher.store.touches import TouchCache

Conn = psycopg.Connection[Any]
_STATE_COLUMNS = "baselined, not_found, consecutive_failures, failing, best_loss, body_hash, revision"


class PostgresStore(PgLifecycle, PgOutbox, PgReports, PgPrune, SharedReads, TouchCache):
    """The PostgreSQL store: one transaction per poll, a cache of decoded state per fine-tune; a ReplicaStore."""

    MARK = "%s"

    def __init__(
        self,
        url: str,
        *,
        readonly: bool = False,
        new_id: Callable[[], str] | None = None,
        pool_min: int = 1,
        pool_max: int = 4,
        connect_timeout_s: float = 10.0,
        idle_limit_s: float | None = None,
    ) -> None:
        """`idle_limit_s`: the server ends a transaction of this store left idle that long (the replicas' lease:
        a stalled replica's locks never outlive its leases); None: no limit."""
        self.readonly = readonly
        self._idle_limit_s = idle_limit_s
        self._new_id = new_id
        self._init_touches()
        self._pool = open_pool(url, min_size=pool_min, max_size=pool_max, timeout_s=connect_timeout_s)
        try:
            # not under a lease: a large database's start-up work is not bounded by the idle limit
            self._tx(
                self._migrate if not readonly else self._check_version, what="open the state database", bounded=False
            )
        except BaseException:
            self._pool.close()
            raise

    @property
    def pool(self) -> Any:
        """The connection pool (shared with the leases)."""
        return self._pool

    def leases(self, *, replica: str, lease_s: float, counted: bool = True) -> PostgresLeases:
        """The lease table as this replica sees it, over this store's pool (`counted=False`: never a live replica)."""
        return PostgresLeases(self._pool, replica=replica, lease_s=lease_s, counted=counted)

    def retention_gate(self) -> AdvisoryGate:
        """The advisory lock one replica at a time holds while it prunes."""
        return AdvisoryGate(self._pool)

    # --- schema ----------------------------------------------------------------------------------

    @staticmethod
    def _version(conn: Conn) -> int:
        if conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,):
            return 0
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _check_version(self, conn: Conn) -> int:
        version = self._version(conn)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the PostgreSQL state database has schema version {version}, newer than this release "
                f"({SCHEMA_VERSION}): upgrade oxen-watcher"
            )
        if self.readonly and version < SCHEMA_VERSION:
            raise StoreError("the PostgreSQL state database has no current oxen-watcher schema: start the daemon once")
        return version

    def _migrate(self, conn: Conn) -> None:
        # replicas starting together migrate one at a time; the later ones find the work done
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        if self._check_version(conn) == SCHEMA_VERSION:
            return  # nothing to create: a role with only row rights (no CREATE on the schema) opens it
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = self._check_version(conn)
        if conn.execute("SELECT 1 FROM schema_version").fetchone() is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                statement(conn) if callable(statement) else conn.execute(statement)
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))

    @property
    def schema_version(self) -> int:
        """The schema version of the database."""
        return self._tx(self._version, what="read the schema version", bounded=False)

    # --- reads -----------------------------------------------------------------------------------

    def _load_state(self, conn: Conn, key: str, row: tuple[Any, ...] | None) -> tuple[int, FineTuneState]:
        if row is None:
            return -1, FineTuneState()
        baselined, not_found, failures, failing, best_loss, body_hash, revision = row
        cached = self._cache.get(key)
        if cached is not None and cached[0] == revision:
            return cached
        rows = conn.execute(
            "SELECT step, fingerprint, data FROM checkpoints WHERE fine_tune_key = %s ORDER BY step", (key,)
        ).fetchall()
        state = FineTuneState(
            baselined=baselined,
            not_found=not_found,
            consecutive_failures=failures,
            failing=failing,
            best_loss=best_loss,
            body_hash=body_hash,
            checkpoints={s: KnownCheckpoint(step=s, fingerprint=fp, data=orjson.loads(d)) for s, fp, d in rows},
        )
        self._cache[key] = (revision, state)
        return revision, state

    def load_state(self, key: str) -> FineTuneState:
        """The committed state of one fine-tune (an empty state when never seen)."""

        def read(conn: Conn) -> FineTuneState:
            row = conn.execute(f"SELECT {_STATE_COLUMNS} FROM fine_tunes WHERE fine_tune_key = %s", (key,)).fetchone()
            return self._load_state(conn, key, row)[1]

        return self._tx(read, what="read state", bounded=False)

    def not_before(self, key: str) -> float | None:
        """The Unix time before which the Hub asked not to be polled for this fine-tune."""
        rows = self._read("SELECT not_before FROM fine_tunes WHERE fine_tune_key = %s", (key,), what="read state")
        return rows[0][0] if rows else None

    # --- the one write path ----------------------------------------------------------------------

    def apply_poll(
        self,
        ref: FineTuneRef,
        result: PollResult,
        *,
        options: DiffOptions,
        now: float,
        commit: bool = True,
        route: Router | None = None,
        fence: tuple[str, int] | None = None,
    ) -> Committed | None:
        """Diff a poll result against the stored state and commit state, events and outbox in one transaction.

        As SqliteStore.apply_poll; `fence=(replica, epoch)` additionally requires that this replica still holds
        the fine-tune's lease at that epoch when the transaction commits, else nothing is written and LeaseLost
        is raised.
        """
        if commit and self.readonly:
            raise StoreError("the state database is open read-only")
        key = ref.key
        if commit:
            self._drop_touch(key, now)
        outcome: list[Any] = []

        def work(conn: Conn) -> None:
            if commit:
                # serializes polls of one fine-tune, and makes the transaction id (taken after it) grow with them
                conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
                if fence is not None:
                    check_fence(conn, key, fence, what="poll")
            lock = " FOR UPDATE" if commit else ""
            row = conn.execute(
                f"SELECT {_STATE_COLUMNS} FROM fine_tunes WHERE fine_tune_key = %s{lock}", (key,)
            ).fetchone()
            revision, old = self._load_state(conn, key, row)
            if isinstance(result, PollUnchanged) and old.body_hash != result.body_hash:
                raise psycopg.Rollback()
            transition = diff(ref, old, result, options=options)
            new_id = self._new_id
            events = tuple(
                stamp(draft, fine_tune_key=key, now=now, event_id=new_id() if new_id else None)
                for draft in transition.events
            )
            outcome[:] = [row, revision, transition, events]
            if not commit:
                raise psycopg.Rollback()
            self._write(conn, key, row is None, revision, result, transition.state, now)
            if transition.upserts:
                conn.cursor().executemany(
                    "INSERT INTO checkpoints (fine_tune_key, step, fingerprint, data) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (fine_tune_key, step) DO UPDATE "
                    "SET fingerprint = excluded.fingerprint, data = excluded.data",
                    [(key, c.step, c.fingerprint, orjson.dumps(c.data).decode()) for c in transition.upserts],
                )
            if transition.deletes:
                conn.execute(
                    "DELETE FROM checkpoints WHERE fine_tune_key = %s AND step = ANY(%s)",
                    (key, list(transition.deletes)),
                )
            if transition.upserts or transition.deletes:  # the status page's summary, in the same commit
                checkpoints = {step: known.data for step, known in transition.state.checkpoints.items()}
                conn.execute(summary_upsert("%s"), summary_row(key, summary_of_checkpoints(checkpoints)))
            self._insert_events(conn, events, now=now, route=route)
            outcome.append(True)

        try:
            self._tx(work, what=f"commit poll of {key}")
        except BaseException:
            self._cache.pop(key, None)
            raise
        if not outcome:
            return None  # PollUnchanged, but another writer moved the state on
        row, revision, transition, events = outcome[:4]
        if len(outcome) == 4:
            return Committed(events, transition.state)  # a dry run: the cache keeps the committed state
        self._cache[key] = (revision + 1 if row is not None else 0, transition.state)
        return Committed(events, transition.state, bool(transition.upserts or transition.deletes))

    def _insert_events(self, conn: Conn, events: Sequence[Event], *, now: float, route: Router | None) -> None:
        if not events:
            return
        # seq follows the transaction id: events_after can stop below every transaction still in progress
        row = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        assert row is not None, "SELECT of a function returns one row"
        xid = row[0]
        batch_id = events[0].id
        rows, deliveries = [], []
        for index, event in enumerate(events):
            seq = (xid << SEQ_SHIFT) + index
            rows.append((seq, event.id, event.type, event.fine_tune_key, now, orjson.dumps(event.envelope()).decode()))
            for notifier in route(event) if route else ():
                deliveries.append((seq, event.id, notifier, event.fine_tune_key, batch_id, now, now))
        cursor = conn.cursor()
        cursor.executemany(
            "INSERT INTO events (seq, xid, id, type, fine_tune_key, created_at, envelope) "
            "VALUES (%s, pg_current_xact_id(), %s, %s, %s, %s, %s)",
            rows,
        )
        if deliveries:
            cursor.executemany(
                "INSERT INTO deliveries (event_seq, event_id, notifier, fine_tune_key, batch_id, state, attempts, "
                "next_attempt_at, queued_at) VALUES (%s, %s, %s, %s, %s, 'pending', 0, %s, %s)",
                deliveries,
            )

    @staticmethod
    def _write(
        conn: Conn, key: str, new: bool, revision: int, result: PollResult, state: FineTuneState, now: float
    ) -> None:
        answered_200 = isinstance(result, PollSuccess | PollUnchanged)  # last_success_at: the last 200
        error = result.error if isinstance(result, PollFailed) else None
        retry_after_s = result.retry_after_s if isinstance(result, PollFailed) else None
        values = (
            state.baselined,
            state.not_found,
            state.consecutive_failures,
            state.failing,
            state.best_loss,
            state.body_hash,
            now + retry_after_s if retry_after_s else None,
            now,
            outcome_of(result),
            error,
            result.http_status,
        )
        if new:
            conn.execute(
                "INSERT INTO fine_tunes (baselined, not_found, consecutive_failures, failing, best_loss, body_hash, "
                "not_before, last_poll_at, last_outcome, last_error, last_http_status, last_success_at, revision, "
                "fine_tune_key) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 0, %s)",
                (*values, now if answered_200 else None, key),
            )
        else:
            conn.execute(
                "UPDATE fine_tunes SET baselined = %s, not_found = %s, consecutive_failures = %s, failing = %s, "
                "best_loss = %s, body_hash = %s, not_before = %s, last_poll_at = %s, last_outcome = %s, "
                "last_error = %s, last_http_status = %s, "
                "last_success_at = CASE WHEN %s THEN last_success_at ELSE %s END, revision = %s "
                "WHERE fine_tune_key = %s",
                (*values, not answered_200, now, revision + 1, key),
            )


def _conforms(store: PostgresStore) -> Store:
    """Checked by mypy: PostgresStore implements the Store protocol."""
    return store


__all__ = ["PostgresStore", "store_error"]


def _replica_store(store: PostgresStore) -> ReplicaStore:
    """Checked by mypy: PostgresStore implements the ReplicaStore protocol."""
    return store
