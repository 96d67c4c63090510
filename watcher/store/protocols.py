"""What the rest of the watcher needs from durable state: one small protocol per concern (SQLite now,
PostgreSQL later). `Store` combines them; the contract suite (tests/store_contract) runs against them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from watcher.core.diff import DiffOptions
from watcher.core.health import LongOperation
from watcher.core.lifecycle import LifecycleOptions
from watcher.core.models import (
    Delivery,
    Event,
    EventDraft,
    FineTuneRef,
    FineTuneState,
    FineTuneStatus,
    HubFineTune,
    LifecycleState,
    OutboxStats,
    PollResult,
    SourceState,
)
from watcher.store.replicas import Fence, ListedStatuses, SourceFence


@dataclass(frozen=True, slots=True)
class Committed:
    """What one applied poll committed: its events (in order) and the state after it."""

    events: tuple[Event, ...]
    state: FineTuneState
    checkpoints_changed: bool = False


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What one retention pass removed (or, on a dry run, would remove)."""

    events: int = 0
    deliveries: int = 0
    bytes_freed: int = 0
    done: bool = True  # False when a bounded pass (max_batches) left work for the next one

    def __add__(self, other: PruneReport) -> PruneReport:
        return PruneReport(
            self.events + other.events,
            self.deliveries + other.deliveries,
            self.bytes_freed + other.bytes_freed,
            other.done,
        )


Router = Callable[[Event], Sequence[str]]


class StateStore(Protocol):
    """The committed state of each fine-tune and the one write path that moves it on."""

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
        """Diff a poll result against the stored state; commit state, events and outbox rows in one transaction."""
        ...

    def load_state(self, key: str) -> FineTuneState:
        """The committed state of one fine-tune, read from the database (an empty state when never seen)."""
        ...

    def load_cached(self, key: str) -> FineTuneState:
        """The state of a fine-tune as this process last saw it (no I/O)."""
        ...

    def observe_unchanged(self, key: str, body_hash: str, *, now: float) -> FineTuneState | None:
        """Touch or diff: the state when a 200 with this body changes nothing but the poll time (recorded in a
        batch written by `flush_touches`); None when the answer must be diffed for real (apply_poll)."""
        ...

    def flush_touches(self) -> list[str]:
        """Write the batched poll times; returns the keys another writer moved on (their cache is dropped)."""
        ...

    def forget(self, key: str) -> None:
        """Drop the cached state of a fine-tune."""
        ...

    def body_hash(self, key: str) -> str | None:
        """The hash of the last committed 200 body of a fine-tune."""
        ...

    def not_before(self, key: str) -> float | None:
        """The Unix time before which the Hub asked not to be polled for this fine-tune."""
        ...

    def statuses(self, keys: Sequence[str] | None = None) -> list[FineTuneStatus]:
        """Per fine-tune status, for `status` and metrics."""
        ...


class EventLog(Protocol):
    """The committed events, in commit order."""

    def recent_events(self, *, limit: int = 50, type_glob: str | None = None) -> list[Event]:
        """Committed events, newest first; `type_glob` as fnmatch (case-sensitive) on the type."""
        ...

    def events_after(self, seq: int, *, limit: int = 1000) -> list[tuple[int, Event]]:
        """Committed events with a sequence number above `seq`, oldest first."""
        ...

    def events_by_id(self, event_ids: Sequence[str]) -> dict[str, Event]:
        """Committed events by id."""
        ...


class Outbox(Protocol):
    """One row per (event, notifier), delivered in order per (notifier, fine-tune) lane."""

    def due_deliveries(self, notifiers: Sequence[str], *, now: float, limit: int = 500) -> list[Delivery]:
        """The due head of each (notifier, fine-tune) lane."""
        ...

    def next_due_at(self, notifiers: Sequence[str]) -> float | None:
        """The earliest next attempt among pending rows of these notifiers."""
        ...

    def lane_batch(self, head: Delivery, *, limit: int = 1000) -> list[Delivery]:
        """The pending rows of the head's lane that came from the same poll."""
        ...

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
        """Record the outcome of one delivery attempt."""
        ...

    def deliveries_of(self, event_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        """The outbox rows of these events."""
        ...

    def redeliver(
        self,
        *,
        now: float,
        event_ids: Sequence[str] = (),
        dead: bool = False,
        notifier: str | None = None,
        route: Router | None = None,
        since: float | None = None,
    ) -> int:
        """Queue dead rows (queued at or after `since`) or named events again."""
        ...

    def outbox_stats(self) -> list[OutboxStats]:
        """Pending rows per notifier."""
        ...

    def retire_notifiers(self, known: Sequence[str], *, now: float, reason: str = "notifier_removed") -> int:
        """Pending rows of notifiers not in `known` become dead with `reason`; returns how many."""
        ...


class Retention(Protocol):
    """Bounded history: old events leave with their finished outbox rows."""

    @property
    def long_operation(self) -> LongOperation | None:
        """The planned long operation holding the store's thread now (a rewrite of the file), if any."""
        ...

    def prune(
        self,
        *,
        now: float,
        retain_s: float,
        batch: int = 500,
        dry_run: bool = False,
        max_batches: int | None = None,
    ) -> PruneReport:
        """Delete events older than `retain_s` (never one with a pending delivery) with their delivered and dead
        rows, `batch` events per short transaction, then give the space back to the file system."""
        ...


@dataclass(frozen=True, slots=True)
class LifecycleRecord:
    """One fine-tune's persisted lifecycle: its state, the source that watches it ("config" or a [[discover]]
    name), when its status was last read (Unix time), and whether its checkpoints are announced rather than
    baselined (a fine-tune discovered after its source's first read is new: everything it has is news)."""

    state: LifecycleState
    source: str | None = None
    status_at: float | None = None
    announce_checkpoints: bool = False


@dataclass(frozen=True, slots=True)
class LifecycleCommitted:
    """What one lifecycle evaluation committed: its events and the record after it."""

    events: tuple[Event, ...]
    record: LifecycleRecord
    poll_checkpoints_now: bool = False


class LifecycleStore(Protocol):
    """Lifecycle state per fine-tune and discovery state per source, committed with their events and outbox."""

    def load_lifecycle(self, keys: Sequence[str] | None = None) -> dict[str, LifecycleRecord]:
        """The persisted lifecycle records of these fine-tunes (all when None); absent ones were never seen."""
        ...

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
        """advance() the stored state with a status read (or, fine_tune None, the committed checkpoints alone)
        and commit the state, its events and their outbox rows in one transaction (nothing when unchanged)."""
        ...

    def discovered_names(self) -> dict[str, tuple[str, str]]:
        """Every fine-tune a source found: key -> (source name, the Hub's name for it), for `status`."""
        ...

    def load_source(self, name: str) -> SourceState:
        """A source's persisted state (an empty one when never read)."""
        ...

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
        """Commit a source's new state and its discovered events (with outbox rows) in one transaction;
        `sources` names fine-tunes this source now watches (True: announce their checkpoints, they are new);
        replicas: `watching` and `listed` (the statuses this read listed) are for the replicas that do not read it."""
        ...


class Store(StateStore, EventLog, Outbox, Retention, LifecycleStore, Protocol):
    """Durable state of the watcher: every concern, one database."""

    def close(self) -> None:
        """Release the database."""
        ...
