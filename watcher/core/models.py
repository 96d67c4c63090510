"""Values that flow through the watcher: fine-tune references, poll results, state, events.

This module imports nothing from the package, so every other module can depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

JSON = dict[str, Any]

# Event types: public interface (receivers and users' scripts match on them).
CHECKPOINT_CREATED = "checkpoint.created"
CHECKPOINT_UPDATED = "checkpoint.updated"
CHECKPOINT_DEPLOYMENT_CHANGED = "checkpoint.deployment_changed"
CHECKPOINT_REMOVED = "checkpoint.removed"
FINE_TUNE_NOT_FOUND = "fine_tune.not_found"
FINE_TUNE_POLL_FAILING = "fine_tune.poll_failing"
FINE_TUNE_POLL_RECOVERED = "fine_tune.poll_recovered"
FINE_TUNE_DISCOVERED = "fine_tune.discovered"
FINE_TUNE_STATUS_CHANGED = "fine_tune.status_changed"
FINE_TUNE_STALLED = "fine_tune.stalled"
WATCHER_TEST = "watcher.test"

EVENT_TYPES = (
    CHECKPOINT_CREATED,
    CHECKPOINT_UPDATED,
    CHECKPOINT_DEPLOYMENT_CHANGED,
    CHECKPOINT_REMOVED,
    FINE_TUNE_NOT_FOUND,
    FINE_TUNE_POLL_FAILING,
    FINE_TUNE_POLL_RECOVERED,
    FINE_TUNE_DISCOVERED,
    FINE_TUNE_STATUS_CHANGED,
    FINE_TUNE_STALLED,
    WATCHER_TEST,
)
# the types the lifecycle and discovery rules produce (diff.py produces the others but watcher.test)
LIFECYCLE_EVENT_TYPES = (FINE_TUNE_DISCOVERED, FINE_TUNE_STATUS_CHANGED, FINE_TUNE_STALLED)


@dataclass(frozen=True, slots=True)
class FineTuneRef:
    """One watched fine-tune: where it lives on the Hub and what to call it."""

    namespace: str
    repo: str
    id: str
    name: str

    @property
    def key(self) -> str:
        """The stable identity "namespace/repo/id" used in state, filters and logs."""
        return f"{self.namespace}/{self.repo}/{self.id}"

    def as_data(self) -> JSON:
        """The `fine_tune` object carried in every event's data."""
        return {"namespace": self.namespace, "repo": self.repo, "id": self.id, "name": self.name}


# --- poll results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PollSuccess:
    """The Hub answered 200 with a valid body; checkpoints are the raw dicts, sorted by step."""

    checkpoints: tuple[JSON, ...]
    body_hash: str
    http_status: int = 200


@dataclass(frozen=True, slots=True)
class PollUnchanged:
    """The Hub answered 200 with a body byte-identical to the last committed one: nothing to diff."""

    body_hash: str
    http_status: int = 200


@dataclass(frozen=True, slots=True)
class PollNotFound:
    """The Hub answered 404: the fine-tune does not exist (not a failed poll)."""

    http_status: int = 404


PollOutcome = Literal["ok", "not_found", "unauthorized", "error"]


@dataclass(frozen=True, slots=True)
class PollFailed:
    """The poll failed (HTTP error, timeout, bad body); `outcome` is the metrics label."""

    error: str
    http_status: int | None
    outcome: PollOutcome = "error"
    retry_after_s: float | None = None


PollResult = PollSuccess | PollUnchanged | PollNotFound | PollFailed


def outcome_of(result: PollResult) -> PollOutcome:
    """The metrics/status label of a poll result."""
    if isinstance(result, PollFailed):
        return result.outcome
    if isinstance(result, PollNotFound):
        return "not_found"
    return "ok"


# --- state -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KnownCheckpoint:
    """A checkpoint as last committed: its fingerprint decides whether anything changed."""

    step: int
    fingerprint: str
    data: Mapping[str, Any]

    @property
    def deployment_status(self) -> str | None:
        """The deployment status verbatim as the Hub last reported it."""
        value = self.data.get("deployment_status")
        return value if isinstance(value, str) else None

    @property
    def loss(self) -> float | None:
        """The checkpoint's training loss, when reported."""
        return metric_of(self.data, "loss")


@dataclass(frozen=True, slots=True)
class FineTuneState:
    """Everything the diff needs to know about one fine-tune from before this poll."""

    baselined: bool = False
    not_found: bool = False
    consecutive_failures: int = 0
    failing: bool = False
    best_loss: float | None = None
    body_hash: str | None = None
    checkpoints: Mapping[int, KnownCheckpoint] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event before it has an id and a timestamp: what the pure diff produces."""

    type: str
    data: JSON


@dataclass(frozen=True, slots=True)
class Transition:
    """What one poll changes: the events, the new state, and which checkpoint rows to write or delete."""

    events: tuple[EventDraft, ...]
    state: FineTuneState
    upserts: tuple[KnownCheckpoint, ...] = ()
    deletes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    """A committed event: the envelope receivers get (`id`, `type`, `timestamp`, `data`)."""

    id: str
    type: str
    timestamp: str
    data: JSON
    fine_tune_key: str = ""

    def envelope(self) -> JSON:
        """The public event envelope."""
        return {"id": self.id, "type": self.type, "timestamp": self.timestamp, "data": self.data}


@dataclass(frozen=True, slots=True)
class FineTuneStatus:
    """What `status` shows for one fine-tune, read from the store."""

    key: str
    last_poll_at: float | None
    last_outcome: str | None
    last_error: str | None
    last_http_status: int | None
    last_success_at: float | None
    consecutive_failures: int
    failing: bool
    not_found: bool
    baselined: bool
    not_before: float | None
    checkpoints: int
    latest_step: int | None
    latest_loss: float | None
    latest_created_at: str | None
    metrics: Mapping[str, float | None]
    deployments: Mapping[int, str]


def metric_of(checkpoint: Mapping[str, Any], name: str) -> float | None:
    """A numeric metric of a checkpoint dict, or None when absent, null or not a number."""
    metrics = checkpoint.get("metrics")
    if not isinstance(metrics, Mapping):
        return None
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# --- delivery ------------------------------------------------------------------------------------

DeliveryState = Literal["pending", "delivered", "dead"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One outbox row: an event on its way to one notifier."""

    event_seq: int
    event_id: str
    notifier: str
    fine_tune_key: str
    batch_id: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float | None
    queued_at: float
    last_error: str | None = None
    last_status: int | None = None

    def as_json(self) -> JSON:
        """The `deliveries` entry `events --json` shows."""
        return {
            "notifier": self.notifier,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "last_error": self.last_error,
        }


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Pending deliveries of one notifier, for metrics and STATUS= lines."""

    notifier: str
    pending: int
    oldest_pending_at: float | None


# --- lifecycle and discovery ---------------------------------------------------------------------

# Fine-tune statuses the Hub documents; any other value is kept verbatim as an opaque string.
TERMINAL_STATUSES = frozenset({"completed", "stopped", "errored"})


@dataclass(frozen=True, slots=True)
class HubFineTune:
    """A fine-tune as the Hub describes it (a list entry or the single-fine-tune answer), validated.

    Every field but `id` may be missing or null; `status` is verbatim (unknown values kept as opaque strings);
    `created_by` is the creator's username when the Hub gives one; `raw` is the object as the Hub sent it.
    """

    id: str
    name: str | None = None
    status: str | None = None
    error: str | None = None
    base_model: str | None = None
    created_by: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


def parse_time(value: str | None) -> float | None:
    """Unix seconds of an ISO 8601 time from the Hub (a time without a zone is UTC), or None when unparsable."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:  # Phoenix serializes NaiveDateTime without a zone; the Hub's times are UTC
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@dataclass(frozen=True, slots=True)
class FetchedNotFound:
    """A 404 answer: the fine-tune (or the repository of a list) does not exist."""


@dataclass(frozen=True, slots=True)
class LifecycleState:
    """What must persist per fine-tune for lifecycle events: its last status and the stall clock.

    `status` is None until the first status read (which is recorded silently). `first_seen_at` is when the
    watcher first saw the fine-tune; `newest_step` is the newest checkpoint known, and `newest_seen_at` when it
    was first seen (or, with no checkpoint yet, when the fine-tune was first seen running): the stall clock
    when the Hub gives no created_at or started_at. `stalled` is set once a fine_tune.stalled was emitted for
    the current stall and cleared by a new checkpoint (or by leaving running).
    """

    status: str | None = None
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    first_seen_at: float | None = None
    newest_step: int | None = None
    newest_seen_at: float | None = None
    stalled: bool = False


@dataclass(frozen=True, slots=True)
class SourceState:
    """What must persist per [[discover]] source: whether its first read was recorded, and every id it listed.

    Ids are never removed (a fine-tune missing from a list is not gone; only a 404 says that).
    """

    baselined: bool = False
    known_ids: frozenset[str] = frozenset()
