"""What the process knows about one watched fine-tune, held in one object, and what a poll reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from watcher.config.load import FineTuneConfig
from watcher.core.health import PollHealth
from watcher.core.models import (
    Event,
    FineTuneRef,
    FineTuneStatus,
    PollFailed,
    PollResult,
    PollSuccess,
    PollUnchanged,
    outcome_of,
)
from watcher.observe.metrics import PollChildren
from watcher.store import LifecycleRecord

log = structlog.get_logger("watcher")


def ref_of(fine_tune: FineTuneConfig) -> FineTuneRef:
    """The FineTuneRef of a configured fine-tune."""
    return FineTuneRef(fine_tune.namespace, fine_tune.repo, fine_tune.id, fine_tune.display_name)


@dataclass(slots=True, eq=False)
class WatchedFineTune:
    """Everything this process knows about one watched fine-tune; created when watching starts, dropped whole.

    A poll holds on to its object: when the fine-tune is dropped meanwhile (`watched` is False), the late
    result still commits (the state may stay) but touches no health, metric or log line of the process.
    """

    ref: FineTuneRef
    health: PollHealth = field(default_factory=PollHealth)
    not_before: float | None = None  # the Hub's Retry-After for this fine-tune (Unix time)
    unauthorized: bool = False  # the last answer was 401/403
    status: FineTuneStatus | None = None  # what the metrics show, refreshed when the state changes
    children: PollChildren | None = None  # its poll counters (created at 0 when watching starts)
    watched: bool = True
    source: str = "config"  # "config" ([[fine_tunes]]) or the [[discover]] source that found it
    interval_s: float = 60.0  # its checkpoint interval while running ([[fine_tunes]] interval_s, else [watch])
    lifecycle: LifecycleRecord | None = None  # its lifecycle as last committed (None: not loaded yet)

    def record(self, result: PollResult, now: float) -> int:
        """Take in a committed poll's outcome (health, hold-back, state-change log lines).

        Returns how the 401/403 flag changed (+1, -1 or 0), for the Hub-wide line the watcher logs.
        """
        key = self.ref.key
        health = self.health
        if health.store_failing:
            log.info("store.recovered", fine_tune=key)
            health.store_failing = False
        outcome = outcome_of(result)
        health.polls += 1
        health.last_poll_at = now
        health.deferred = False
        previous, health.last_outcome = health.last_outcome, outcome
        change = 0
        if isinstance(result, PollFailed):
            health.last_error = result.error
            if result.retry_after_s:
                self.not_before = now + result.retry_after_s
            if result.outcome == "unauthorized":
                change = 0 if self.unauthorized else 1
                self.unauthorized = True
            elif previous != "error":
                log.warning(
                    "poll.failed",
                    fine_tune=key,
                    error=result.error,
                    http_status=result.http_status,
                    retry_after_s=result.retry_after_s,
                )
            if health.failing_since is None:
                health.failing_since = now
            return change
        self.not_before = None
        health.last_error = None
        if self.unauthorized:
            self.unauthorized = False
            change = -1
        if previous in ("error", "unauthorized"):
            log.info("poll.recovered", fine_tune=key, outcome=outcome)
        health.failing_since = None
        return change


@dataclass(frozen=True, slots=True)
class PollReport:
    """The outcome of one poll as `once` reports it."""

    ref: FineTuneRef
    result: PollResult | None
    events: tuple[Event, ...] = ()
    error: str | None = None

    @property
    def answered_200(self) -> bool:
        """Whether the Hub answered 200 and the outcome was committed (or previewed)."""
        return self.error is None and isinstance(self.result, PollSuccess | PollUnchanged)
