"""Lifecycle and discovery state in PostgreSQL: the same rows and semantics as sqlite_lifecycle.py.

Each write commits the state with the events it yields and their outbox rows in one transaction, under the
fine-tune's advisory lock (the one apply_poll takes), so a status change and a checkpoint poll of one fine-tune
never interleave. A source's read on replicas commits under the source's lease (a fence, as polls do) together
with what the source watches now, which the other replicas read back with load_watching().
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
import psycopg

from watcher.core.events import stamp
from watcher.core.lifecycle import LifecycleOptions
from watcher.core.models import Event, EventDraft, FineTuneRef, HubFineTune, KnownCheckpoint, SourceState
from watcher.errors import StoreError
from watcher.store.lifecycle_rows import COLUMNS, lifecycle_step, record_of, row_of, upsert_sql
from watcher.store.postgres.base import check_fence
from watcher.store.protocols import LifecycleCommitted, LifecycleRecord, Router
from watcher.store.replicas import ListedStatuses

Conn = psycopg.Connection[Any]


class PgLifecycle:
    """The LifecycleStore half of PostgresStore."""

    readonly: bool
    _new_id: Callable[[], str] | None
    _tx: Callable[..., Any]
    _read: Callable[..., list[tuple[Any, ...]]]
    _insert_events: Callable[..., None]

    def _stamp(self, draft: EventDraft, key: str, now: float) -> Event:
        return stamp(draft, fine_tune_key=key, now=now, event_id=self._new_id() if self._new_id else None)

    def load_lifecycle(self, keys: Sequence[str] | None = None) -> dict[str, LifecycleRecord]:
        """The persisted lifecycle records of these fine-tunes (all when None)."""
        if keys is None:
            rows = self._read(f"SELECT {COLUMNS} FROM lifecycle", what="read lifecycle state")
        else:
            rows = self._read(
                f"SELECT {COLUMNS} FROM lifecycle WHERE fine_tune_key = ANY(%s)",
                (list(keys),),
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
        fence: tuple[str, int] | None = None,
    ) -> LifecycleCommitted:
        """advance() the stored state and commit state, events and outbox rows together (nothing when unchanged).

        Replicas: `fence=(replica, epoch)` requires, as apply_poll's does, that this replica still holds the
        fine-tune's lease at that epoch, else nothing is written and LeaseLost is raised."""
        if commit and self.readonly:
            raise StoreError("the state database is open read-only")
        key = ref.key
        outcome: list[LifecycleCommitted] = []

        def work(conn: Conn) -> None:
            if commit:  # serializes with this fine-tune's polls (apply_poll takes the same lock)
                conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
                if fence is not None:
                    check_fence(conn, key, fence, what="status change")
            row = conn.execute(f"SELECT {COLUMNS} FROM lifecycle WHERE fine_tune_key = %s", (key,)).fetchone()
            committed, changed = lifecycle_step(
                ref,
                row,
                fine_tune,
                checkpoints=_checkpoints(conn, key),
                now=now,
                options=options,
                source=source,
                stamp=lambda draft: self._stamp(draft, key, now),
            )
            outcome.append(committed)
            if not changed:
                return
            if not commit:
                raise psycopg.Rollback()
            _upsert(conn, key, committed.record)
            self._insert_events(conn, committed.events, now=now, route=route)

        self._tx(work, what=f"commit lifecycle of {key}")
        return outcome[0]

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
        fence: tuple[str, str, int] | None = None,
        watching: Sequence[FineTuneRef] | None = None,
        listed: ListedStatuses | None = None,
    ) -> tuple[Event, ...]:
        """Commit a source's new state, its discovered events and outbox rows, in one transaction.

        Replicas: `fence=(lease key, replica, epoch)` requires that this replica still holds the source's lease at
        that epoch (else nothing is written and LeaseLost is raised); `watching` is what the source watches now,
        `listed` the statuses this read listed (kept when None).
        """
        stamped = tuple(self._stamp(draft, ref.key, now) for ref, draft in events)
        if not commit:
            return stamped
        if self.readonly:
            raise StoreError("the state database is open read-only")

        watched = None
        if watching is not None:
            watched = orjson.dumps([[ref.namespace, ref.repo, ref.id, ref.name] for ref in watching]).decode()
        statuses = None if listed is None else _listed_json(listed)

        def work(conn: Conn) -> None:
            if fence is not None:
                check_fence(conn, fence[0], (fence[1], fence[2]), what="source read")
            conn.execute(
                "INSERT INTO sources (name, baselined, watching, listed) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET baselined = excluded.baselined, "
                "watching = COALESCE(excluded.watching, sources.watching), "
                "listed = COALESCE(excluded.listed, sources.listed)",
                (name, int(state.baselined), watched, statuses),
            )
            conn.cursor().executemany(
                "INSERT INTO source_ids (source, fine_tune_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                [(name, fine_tune_id) for fine_tune_id in sorted(state.known_ids)],
            )
            for ref, announce in sources:
                # a fine-tune listed in [[fine_tunes]] keeps "config" as its source
                conn.execute(
                    "INSERT INTO lifecycle (fine_tune_key, source, name, announce_checkpoints) "
                    "VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (fine_tune_key) DO UPDATE SET source = CASE WHEN lifecycle.source = 'config' "
                    "THEN 'config' ELSE excluded.source END, name = excluded.name, "
                    "announce_checkpoints = GREATEST(lifecycle.announce_checkpoints, excluded.announce_checkpoints)",
                    (ref.key, name, ref.name, int(announce)),
                )
            self._insert_events(conn, stamped, now=now, route=route)

        self._tx(work, what=f"commit discovery of {name}")
        return stamped

    def load_watching(self, names: Sequence[str]) -> dict[str, list[FineTuneRef]]:
        """What these sources watch now, as their readers (other replicas) last committed it; a source never read
        on replicas is absent."""
        rows = self._read(
            "SELECT name, watching FROM sources WHERE name = ANY(%s) AND watching IS NOT NULL",
            (list(names),),
            what="read source state",
        )
        return {name: [FineTuneRef(*entry) for entry in orjson.loads(watching)] for name, watching in rows}

    def load_listed(self, names: Sequence[str]) -> dict[str, ListedStatuses]:
        """The statuses these sources' readers (other replicas) last listed, with their read time; a source never
        read on replicas (or only by an earlier release) is absent."""
        rows = self._read(
            "SELECT name, listed FROM sources WHERE name = ANY(%s) AND listed IS NOT NULL",
            (list(names),),
            what="read listed statuses",
        )
        found = {}
        for name, listed in rows:
            data = orjson.loads(listed)
            fine_tunes = tuple(
                HubFineTune(**dict(zip(_LISTED_FIELDS, entry, strict=True))) for entry in data["fine_tunes"]
            )
            found[name] = ListedStatuses(read_at=data["read_at"], fine_tunes=fine_tunes)
        return found


# a listed fine-tune as stored in sources.listed: these fields in this order (not `raw`, which nothing reads)
_LISTED_FIELDS = (
    "id",
    "name",
    "status",
    "error",
    "base_model",
    "created_by",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
)


def _listed_json(listed: ListedStatuses) -> str:
    entries = [[getattr(fine_tune, field) for field in _LISTED_FIELDS] for fine_tune in listed.fine_tunes]
    return orjson.dumps({"read_at": listed.read_at, "fine_tunes": entries}).decode()


def _checkpoints(conn: Conn, key: str) -> Mapping[int, KnownCheckpoint] | None:
    """The committed checkpoints; None while no 200 was committed (not read yet: no stall is judged)."""
    baselined = conn.execute("SELECT baselined FROM fine_tunes WHERE fine_tune_key = %s", (key,)).fetchone()
    if baselined is None or not baselined[0]:
        return None
    rows = conn.execute(
        "SELECT step, fingerprint, data FROM checkpoints WHERE fine_tune_key = %s ORDER BY step", (key,)
    ).fetchall()
    return {step: KnownCheckpoint(step=step, fingerprint=fp, data=orjson.loads(data)) for step, fp, data in rows}


def _upsert(conn: Conn, key: str, record: LifecycleRecord) -> None:
    conn.execute(upsert_sql("%s"), row_of(key, record))
