"""Values about the process's own health: a health check's verdict, and what it knows of one fine-tune's polls.

The daemon computes them, the HTTP endpoints and the status page show them; they live here so neither side
imports the other.
"""

from __future__ import annotations

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
