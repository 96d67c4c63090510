"""Hub-wide back-off: one gate per Hub client that every poll passes before each request.

A 429 (or any answer with Retry-After) is the Hub speaking about the token, not about one fine-tune: the gate
closes for every poll until the Retry-After (or an exponential Hub-wide back-off when none is given), then lets
ONE probe request through; its answer reopens the gate or closes it again for longer. The quick retries inside
polls draw on one Hub-wide budget, so an outage never multiplies the request rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("watcher.hub")


class HubGate:
    """Open, closed until a monotonic time, or half-open (one probe in flight)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        probe_timeout_s: float = 60.0,
        retry_capacity: float = 10.0,
        retry_refill_per_s: float = 0.5,
    ) -> None:
        self._clock = clock
        self._base = base_backoff_s
        self._max = max_backoff_s
        self._probe_timeout = probe_timeout_s
        self._capacity = retry_capacity
        self._refill = retry_refill_per_s
        self._tokens = retry_capacity
        self._tokens_at = clock()
        self.open_at = 0.0  # monotonic; requests wait until then
        self.throttles = 0  # consecutive throttling answers; 0 = open
        self._probe_until: float | None = None

    @property
    def throttled(self) -> bool:
        """Whether the Hub asked to slow down and has not answered normally since."""
        return self.throttles > 0

    def wait_s(self) -> float:
        """Seconds until a request may go (0 when it may go now, as far as the gate knows)."""
        now = self._clock()
        if now < self.open_at:
            return self.open_at - now
        if self._probe_until is not None and now < self._probe_until:
            return self._probe_until - now
        return 0.0

    def admit(self) -> bool:
        """Whether a request may go now; while throttled, the first caller after the wait is the probe."""
        if not self.throttles:
            return True
        now = self._clock()
        if now < self.open_at or (self._probe_until is not None and now < self._probe_until):
            return False
        self._probe_until = now + self._probe_timeout
        return True

    def on_throttle(self, retry_after_s: float | None) -> float:
        """A 429 or a Retry-After: close the gate for every poll; returns how long it stays closed."""
        now = self._clock()
        if self.throttles and now < self.open_at:
            # another answer of the same round (requests that were in flight together): no longer back-off,
            # only a later Retry-After if this one names one
            if retry_after_s is not None:
                self.open_at = max(self.open_at, now + retry_after_s)
            return self.open_at - now
        self.throttles += 1
        if retry_after_s is not None:
            wait = retry_after_s
        else:
            wait = min(self._max, self._base * 2 ** (self.throttles - 1))
        self.open_at = max(self.open_at, now + wait)
        self._probe_until = None
        if self.throttles == 1:
            log.warning("hub.throttled", retry_after_s=retry_after_s, wait_s=round(wait, 3))
        return wait

    def on_answer(self) -> None:
        """Any other answer (or a failure that says nothing about throttling): open the gate again."""
        if not self.throttles and self._probe_until is None:
            return
        if self.throttles:
            log.info("hub.recovered", throttled_answers=self.throttles)
        self.throttles = 0
        self.open_at = 0.0
        self._probe_until = None

    def release_probe(self) -> None:
        """A probe that ended without an answer (cancelled): let the next caller probe."""
        self._probe_until = None

    def take_retry(self) -> bool:
        """Take one quick retry from the Hub-wide budget (refilled over time); False when it is spent."""
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._tokens_at) * self._refill)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
