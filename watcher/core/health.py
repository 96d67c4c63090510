"""Values about the process's own health: a health check's verdict, and what it knows of one fine-tune's polls.

The daemon computes them, the HTTP endpoints and the status page show them; they live here so neither side
imports the other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Verdict:
    """An answer of a health check (liveness, readiness): ok, why not, and details for /readyz's JSON."""

    ok: bool
    reason: str = ""
    detail: dict[str, object] | None = None


@dataclass(slots=True)
class PollHealth:
    """What this process knows about one fine-tune's polls (health, metrics and the status page read it).

    The daemon updates its own record in place after each poll; readers on other threads get a copy
    (`dataclasses.replace`).
    """

    polls: int = 0
    last_outcome: str | None = None
    last_error: str | None = None
    last_poll_at: float | None = None
    failing_since: float | None = None
    store_failing: bool = False
    crashed: int = 0
    deferred: bool = False


@dataclass(frozen=True, slots=True)
class LongOperation:
    """A planned store operation that holds the store's thread for long (a rewrite of the database file): what
    it does, when it started and when it is expected to end, on the monotonic clock (health compares) and the
    wall clock (people read)."""

    what: str
    started_at: float
    expected_end: float
    started_wall: float

    @classmethod
    def begin(cls, what: str, *, expected_s: float) -> LongOperation:
        """One starting now, expected to take at most `expected_s`."""
        now = time.monotonic()
        return cls(what, started_at=now, expected_end=now + expected_s, started_wall=time.time())

    def overrun(self, now: float) -> bool:
        """Whether it runs past its expected end at monotonic time `now`."""
        return now > self.expected_end

    def describe(self) -> str:
        """One line for people: what, since when, expected to end by when (UTC)."""
        end_wall = self.started_wall + (self.expected_end - self.started_at)
        return (
            f"a planned long store operation in progress ({self.what}) since {_utc(self.started_wall)}, "
            f"expected to end by {_utc(end_wall)}"
        )


def _utc(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))
