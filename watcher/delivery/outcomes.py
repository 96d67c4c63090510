"""What the dispatcher says about delivery outcomes: state changes once (a notifier failing, recovering, a
backlog expiring), each scheduled retry and dead row, and a notifier a 410 disabled."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import structlog

from watcher.core.models import Delivery
from watcher.delivery.retry import Settled

log = structlog.get_logger("watcher.dispatch")


class OutcomeLog:
    """Logs delivery outcomes per notifier, state changes rather than repeats."""

    def __init__(self) -> None:
        self._failing: set[str] = set()
        self._expiring: set[str] = set()

    def settled(
        self, name: str, head: Delivery, ids: Sequence[str], settled: Settled, *, now: float, http_status: int | None
    ) -> None:
        """Log one recorded attempt."""
        error = settled.error
        if settled.state == "delivered":
            if name in self._failing:
                self._failing.discard(name)
                log.info("delivery.recovered", notifier=name)
            log.debug("delivery.delivered", notifier=name, event_ids=list(ids))
            return
        if name not in self._failing:
            self._failing.add(name)
            log.warning("delivery.failing", notifier=name, error=error, http_status=http_status)
        if settled.state == "retry":
            log.info(
                "delivery.retry_scheduled",
                notifier=name,
                event_id=head.event_id,
                attempt=head.attempts + 1,
                wait_s=round((settled.next_attempt_at or now) - now, 1),
                error=error,
            )
        else:
            log.warning("delivery.dead", notifier=name, event_ids=list(ids), attempts=head.attempts + 1, error=error)

    def disabled(self, name: str, http_status: int | None) -> None:
        """Log a notifier stopped by a 410 Gone."""
        log.error(
            "notifier.disabled",
            notifier=name,
            http_status=http_status,
            reason="the receiver answered 410 Gone; its pending events wait until a reload or restart",
        )

    def expired(self, name: str, ids: Sequence[str], *, max_age_s: float) -> None:
        """Log rows given up on before their first attempt: once when a notifier's backlog starts expiring."""
        if name not in self._expiring:  # a backlog expires lane head by lane head
            self._expiring.add(name)
            log.warning("delivery.expired", notifier=name, event_ids=list(ids[:10]), rows=len(ids), max_age_s=max_age_s)

    def expiring_only(self, names: Iterable[str]) -> None:
        """The notifiers whose rows expired in the last pass; the others' backlogs are over."""
        self._expiring &= set(names)
