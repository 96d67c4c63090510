"""What the status page reads from durable state: value types and the `Reports` protocol (SQLite, PostgreSQL)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from watcher.core.models import Delivery, Event


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One fine-tune's persisted state, condensed for the overview table."""

    key: str
    last_poll_at: float | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    last_http_status: int | None = None
    last_success_at: float | None = None
    consecutive_failures: int = 0
    failing: bool = False
    not_found: bool = False
    checkpoints: int = 0
    latest_step: int | None = None
    latest_loss: float | None = None
    latest_created_at: str | None = None
    latest_deployment: str | None = None
    best_loss: float | None = None
    best_step: int | None = None
    hub_status: str | None = None
    replica: str | None = None  # the replica holding its lease (PostgreSQL); None on SQLite or while unowned
    spark: tuple[tuple[int, float], ...] = ()  # (step, loss), at most SPARK_POINTS of them


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    """A checkpoint as last committed (the Hub's dict, verbatim)."""

    step: int
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class EventRow:
    """A committed event with its outbox rows."""

    seq: int
    event: Event
    created_at: float
    deliveries: tuple[Delivery, ...]


@dataclass(frozen=True, slots=True)
class NotifierHealth:
    """Delivery health of one notifier: pending rows, the oldest one's queue time, dead rows."""

    notifier: str
    pending: int
    oldest_pending_at: float | None
    dead: int


class Reports(Protocol):
    """Read-only queries behind the status page; called from a worker thread, never on the event loop."""

    def summaries(self, keys: Sequence[str]) -> dict[str, RunSummary]:
        """The condensed state of these fine-tunes (those never polled are absent)."""
        ...

    def checkpoints(self, key: str) -> list[CheckpointRow]:
        """Every known checkpoint of a fine-tune, by step."""
        ...

    def events(self, *, limit: int = 100, type: str | None = None, fine_tune: str | None = None) -> list[EventRow]:
        """Recent events, newest first, optionally only of one type and of one fine-tune."""
        ...

    def delivery_health(self, notifiers: Sequence[str]) -> list[NotifierHealth]:
        """Pending and dead rows per configured notifier."""
        ...

    def close(self) -> None:
        """Release the database."""
        ...
