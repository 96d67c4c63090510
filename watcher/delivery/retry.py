"""When a delivery is tried: the first attempt after retry_schedule_s[0], retries on the rest of the schedule
(then its last step, repeated) with jitter and Retry-After, never for a row older than max_age_s."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from watcher.config.load import NotifierConfig
from watcher.core.models import Delivery
from watcher.delivery.notifiers.base import DeliveryResult

MAX_ERROR_CHARS = 300


def clip(text: str) -> str:
    """An error message cut to what the outbox keeps."""
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When to try: the schedule (its first step delays the first attempt), +-20 % jitter, Retry-After, max age."""

    schedule_s: tuple[float, ...]
    max_age_s: float
    jitter: float = 0.2

    def first_attempt_at(self, queued_at: float) -> float:
        """When a row queued at `queued_at` is first tried (retry_schedule_s[0] later; no jitter, so stable)."""
        return queued_at + self.schedule_s[0]

    def expired(self, *, queued_at: float, now: float) -> bool:
        """Whether a row queued then is too old to be tried at all (checked before the first attempt)."""
        return now - queued_at > self.max_age_s

    def next_attempt_at(
        self, *, attempts: int, now: float, queued_at: float, retry_after_s: float | None, rng: random.Random
    ) -> float | None:
        """The time of the next attempt after `attempts` failed ones, or None when the row is too old."""
        base = self.schedule_s[attempts] if attempts < len(self.schedule_s) else self.schedule_s[-1]
        delay = base * rng.uniform(1 - self.jitter, 1 + self.jitter)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        when = now + delay
        if when - queued_at > self.max_age_s:
            return None
        return when


FALLBACK_POLICY = RetryPolicy(schedule_s=(60.0,), max_age_s=86400)


def policy_of(entry: NotifierConfig) -> RetryPolicy:
    """The retry policy of a [[notifiers]] entry."""
    return RetryPolicy(schedule_s=tuple(entry.retry_schedule_s), max_age_s=entry.max_age_s)


@dataclass(frozen=True, slots=True)
class Settled:
    """What an attempt makes of its rows: delivered, retried (pending, with its next attempt) or dead."""

    state: Literal["delivered", "retry", "dead"]
    next_attempt_at: float | None
    error: str | None


def settle(
    result: DeliveryResult, *, head: Delivery, policy: RetryPolicy, now: float, rng: random.Random, error: str | None
) -> Settled:
    """The rows' next state after one attempt (`error` is the result's, already redacted and clipped)."""
    if result.outcome != "retry":
        return Settled(result.outcome, None, error)
    next_at = policy.next_attempt_at(
        attempts=head.attempts + 1, now=now, queued_at=head.queued_at, retry_after_s=result.retry_after_s, rng=rng
    )
    if next_at is None:
        return Settled("dead", None, f"gave up after {head.attempts + 1} attempts (max_age_s): {error}")
    return Settled("retry", next_at, error)
