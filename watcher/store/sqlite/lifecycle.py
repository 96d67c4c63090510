"""Lifecycle and discovery state in SQLite: per fine-tune (status, stall clock) and per source (baseline, ids).

Like apply_poll, each write commits the state with the events it yields and their outbox rows in one
transaction, so a crash never leaves an announced status without its state (no re-announce) or the reverse.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from watcher.core.events import stamp
from watcher.core.lifecycle import LifecycleOptions
from watcher.core.models import Event, EventDraft, FineTuneRef, HubFineTune, KnownCheckpoint, SourceState
from watcher.errors import StoreError
from watcher.store.lifecycle_rows import COLUMNS, lifecycle_step, record_of, row_of, upsert_sql
from watcher.store.protocols import LifecycleCommitted, LifecycleRecord, Router
from watcher.store.replicas import Fence, ListedStatuses, SourceFence
from watcher.store.sqlite.base import SqliteBase


class SqliteLifecycle(SqliteBase):
    """The LifecycleStore half of SqliteStore (it supplies the checkpoints and the event inserts)."""

    _new_id: Any

    def _committed_checkpoints(self, key: str) -> Mapping[int, KnownCheckpoint] | None:
        raise NotImplementedError  # SqliteStore: the committed checkpoints, read inside the open transaction

    def _insert_events(self, events: Sequence[Event], *, now: float, route: Router | None) -> None:
        raise NotImplementedError  # SqliteStore: events and their outbox rows

    def _stamp(self, draft: EventDraft, key: str, now: float) -> Event:
        return stamp(draft, fine_tune_key=key, now=now, event_id=self._new_id() if self._new_id else None)

    def load_lifecycle(self, keys: Sequence[str] | None = None) -> dict[str, LifecycleRecord]:
        """The persisted lifecycle records of these fine-tunes (all when None)."""
        if keys is None:
            rows = self._read(f"SELECT {COLUMNS} FROM lifecycle", what="read lifecycle state")
        else:
            rows = []
            for start in range(0, len(keys), 500):
                chunk = tuple(keys[start : start + 500])
                marks = ", ".join("?" for _ in chunk)
                rows += self._read(
                    f"SELECT {COLUMNS} FROM lifecycle WHERE fine_tune_key IN ({marks})",
                    chunk,
                    what="read lifecycle state",
                )
        return {row[0]: record_of(row) for row in rows}

    def apply_lifecycle(
        self,
        ref: FineTuneRef,
        fine_tune: HubFineTune | None,
        *,
        options: LifecycleOptions,
        now: float,
        source: str | None = None,
        commit: bool = True,
        route: Router | None = None,
        fence: Fence | None = None,
    ) -> LifecycleCommitted:
        """advance() the stored state and commit state, events and outbox rows together (nothing when unchanged);
        no lease to check (`fence`): one process owns a SQLite database whole."""
        key = ref.key

        def work() -> LifecycleCommitted:
            row = self._db.execute(f"SELECT {COLUMNS} FROM lifecycle WHERE fine_tune_key = ?", (key,)).fetchone()
            committed, changed = lifecycle_step(
                ref,
                row,
                fine_tune,
                checkpoints=self._committed_checkpoints(key),
                now=now,
                options=options,
                source=source,
                stamp=lambda draft: self._stamp(draft, key, now),
            )
            if changed and commit:
                self._upsert(key, committed.record)
                self._insert_events(committed.events, now=now, route=route)
            return committed

        return self._tx(work, commit=commit, what=f"commit lifecycle of {key}")

    def _tx(self, fn: Any, *, commit: bool, what: str) -> Any:
        if commit:
            return self._write_tx(fn, what=what)
        try:
            self._db.execute("BEGIN")
            try:
                return fn()
            finally:
                self._db.execute("ROLLBACK")
        except sqlite3.Error as err:
            raise StoreError(f"cannot {what}: {err}") from err

    def _upsert(self, key: str, record: LifecycleRecord) -> None:
        self._db.execute(upsert_sql("?"), row_of(key, record))

    def apply_discovery(
        self,
        name: str,
        state: SourceState,
        events: Sequence[tuple[FineTuneRef, EventDraft]],
        *,
        now: float,
        sources: Sequence[tuple[FineTuneRef, bool]] = (),
        commit: bool = True,
        route: Router | None = None,
        fence: SourceFence | None = None,
        watching: Sequence[FineTuneRef] | None = None,
        listed: ListedStatuses | None = None,
    ) -> tuple[Event, ...]:
        """Commit a source's new state, its discovered events and outbox rows, in one transaction (`fence`,
        `watching` and `listed` are for replicas on a shared store: one process owns a SQLite database whole)."""
        stamped = tuple(self._stamp(draft, ref.key, now) for ref, draft in events)
        if not commit:
            return stamped

        def work() -> tuple[Event, ...]:
            self._db.execute(
                "INSERT INTO sources (name, baselined) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET baselined = excluded.baselined",
                (name, int(state.baselined)),
            )
            self._db.executemany(
                "INSERT INTO source_ids (source, fine_tune_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(name, fine_tune_id) for fine_tune_id in sorted(state.known_ids)],
            )
            for ref, announce in sources:
                # a fine-tune listed in [[fine_tunes]] keeps "config" as its source
                self._db.execute(
                    "INSERT INTO lifecycle (fine_tune_key, source, name, announce_checkpoints) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (fine_tune_key) DO UPDATE SET source = CASE WHEN lifecycle.source = 'config' "
                    "THEN 'config' ELSE excluded.source END, name = excluded.name, "
                    "announce_checkpoints = MAX(lifecycle.announce_checkpoints, excluded.announce_checkpoints)",
                    (ref.key, name, ref.name, int(announce)),
                )
            self._insert_events(stamped, now=now, route=route)
            return stamped

        result: tuple[Event, ...] = self._write_tx(work, what=f"commit discovery of {name}")
        return result
