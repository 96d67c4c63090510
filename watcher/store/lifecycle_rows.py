"""The lifecycle table's rows, the same on both stores: its columns, row <-> record, the upsert, and one step of
a fine-tune's lifecycle from its stored row (what to commit, and whether to)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from watcher.core.lifecycle import LifecycleOptions, advance
from watcher.core.models import Event, EventDraft, FineTuneRef, HubFineTune, KnownCheckpoint, LifecycleState
from watcher.store.protocols import LifecycleCommitted, LifecycleRecord

COLUMNS = (
    "fine_tune_key, source, status, error, started_at, finished_at, first_seen_at, newest_step, newest_seen_at, "
    "stalled, status_at, announce_checkpoints"
)


def record_of(row: Sequence[Any]) -> LifecycleRecord:
    """A lifecycle record from its COLUMNS row."""
    _, source, status, error, started, finished, first_seen, newest, newest_at, stalled, status_at, announce = row
    state = LifecycleState(
        status=status,
        error=error,
        started_at=started,
        finished_at=finished,
        first_seen_at=first_seen,
        newest_step=newest,
        newest_seen_at=newest_at,
        stalled=bool(stalled),
    )
    return LifecycleRecord(state, source, status_at, bool(announce))


def upsert_sql(mark: str) -> str:
    """The lifecycle upsert, with `mark` as the placeholder (`?` for SQLite, `%s` for PostgreSQL)."""
    marks = ", ".join([mark] * len(COLUMNS.split(",")))
    return (
        f"INSERT INTO lifecycle ({COLUMNS}) VALUES ({marks}) "
        "ON CONFLICT (fine_tune_key) DO UPDATE SET source = excluded.source, status = excluded.status, "
        "error = excluded.error, started_at = excluded.started_at, finished_at = excluded.finished_at, "
        "first_seen_at = excluded.first_seen_at, newest_step = excluded.newest_step, "
        "newest_seen_at = excluded.newest_seen_at, stalled = excluded.stalled, status_at = excluded.status_at, "
        "announce_checkpoints = excluded.announce_checkpoints"
    )


def row_of(key: str, record: LifecycleRecord) -> tuple[Any, ...]:
    """A lifecycle record as the values of COLUMNS."""
    state = record.state
    return (
        key,
        record.source,
        state.status,
        state.error,
        state.started_at,
        state.finished_at,
        state.first_seen_at,
        state.newest_step,
        state.newest_seen_at,
        int(state.stalled),
        record.status_at,
        int(record.announce_checkpoints),
    )


def lifecycle_step(
    ref: FineTuneRef,
    row: Sequence[Any] | None,
    fine_tune: HubFineTune | None,
    *,
    checkpoints: Mapping[int, KnownCheckpoint] | None,
    now: float,
    options: LifecycleOptions,
    source: str | None,
    stamp: Callable[[EventDraft], Event],
) -> tuple[LifecycleCommitted, bool]:
    """advance() a fine-tune's stored lifecycle row (None: never seen) with a status read; returns what to commit
    and whether anything is to be written (an unchanged record of an existing row is not). `checkpoints`: the
    committed ones, None while no 200 was committed (see advance())."""
    old = record_of(row) if row else LifecycleRecord(LifecycleState())
    transition = advance(ref, old.state, fine_tune, checkpoints=checkpoints, now=now, options=options)
    status_at = now if fine_tune is not None else old.status_at
    record = LifecycleRecord(transition.state, source or old.source, status_at, old.announce_checkpoints)
    events = tuple(stamp(draft) for draft in transition.events)
    if record == old and row is not None:
        return LifecycleCommitted((), record, transition.poll_checkpoints_now), False
    return LifecycleCommitted(events, record, transition.poll_checkpoints_now), True
