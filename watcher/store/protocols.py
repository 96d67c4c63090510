"""What the rest of the watcher needs from durable state, as protocols (SQLite now, PostgreSQL later)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..diff import DiffOptions
from ..models import Delivery, Event, FineTuneRef, FineTuneState, FineTuneStatus, OutboxStats, PollResult


@dataclass(frozen=True, slots=True)
class Committed:
    """What one applied poll committed: its events (in order) and the state after it."""

    events: tuple[Event, ...]
    state: FineTuneState
    checkpoints_changed: bool = False


Router = Callable[[Event], Sequence[str]]


class Store(Protocol):
    """Durable state of the watcher; SQLite now, PostgreSQL later."""

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
        """Diff a poll result against the stored state; commit state, events and outbox rows in one transaction."""
        ...

    def load_cached(self, key: str) -> FineTuneState:
        """The state of a fine-tune as this process last saw it (no I/O)."""
        ...

    def quiet(self, key: str, body_hash: str) -> bool:
        """Whether a 200 with this body would change nothing but the poll times."""
        ...

    def touch(self, polls: Sequence[tuple[str, str, float]]) -> list[str]:
        """Record unchanged 200 polls (key, body hash, time); returns the keys another writer moved on."""
        ...

    def forget(self, key: str) -> None:
        """Drop the cached state of a fine-tune."""
        ...

    def due_deliveries(self, notifiers: Sequence[str], *, now: float, limit: int = 500) -> list[Delivery]:
        """The due head of each (notifier, fine-tune) lane."""
        ...

    def next_due_at(self, notifiers: Sequence[str]) -> float | None:
        """The earliest next attempt among pending rows of these notifiers."""
        ...

    def lane_batch(self, head: Delivery, *, limit: int = 1000) -> list[Delivery]:
        """The pending rows of the head's lane that came from the same poll."""
        ...

    def events_by_id(self, event_ids: Sequence[str]) -> dict[str, Event]:
        """Committed events by id."""
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
    ) -> int:
        """Queue dead rows or named events again."""
        ...

    def outbox_stats(self) -> list[OutboxStats]:
        """Pending rows per notifier."""
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

    def recent_events(self, *, limit: int = 50, type_glob: str | None = None) -> list[Event]:
        """Committed events, newest first."""
        ...

    def events_after(self, seq: int, *, limit: int = 1000) -> list[tuple[int, Event]]:
        """Committed events with a sequence number above `seq`, oldest first."""
        ...

    def close(self) -> None:
        """Release the database."""
        ...
