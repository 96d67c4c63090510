"""The SQLite outbox: one row per (event, notifier); every query of the hot path reads pending rows only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from watcher.core.models import Delivery
from watcher.errors import StoreError
from watcher.store.protocols import Router
from watcher.store.rows import event_from_row
from watcher.store.sqlite.base import DELIVERY_COLUMNS, SqliteBase


class SqliteOutbox(SqliteBase):
    """The outbox half of the SQLite store (a mixin of SqliteStore)."""

    def due_deliveries(self, notifiers: Sequence[str], *, now: float, limit: int = 500) -> list[Delivery]:
        """The head of each (notifier, fine-tune) lane, when it is due: one row per lane keeps event order.

        `limit` applies per notifier, so a slow notifier's backlog never hides another notifier's rows.
        """
        found: list[Delivery] = []
        for notifier in notifiers:
            rows = self._read(
                f"SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.state = 'pending' AND d.notifier = ? "
                "AND d.next_attempt_at <= ? "
                "AND d.event_seq = (SELECT MIN(h.event_seq) FROM deliveries h WHERE h.state = 'pending' "
                "AND h.notifier = d.notifier AND h.fine_tune_key = d.fine_tune_key) "
                "ORDER BY d.next_attempt_at, d.event_seq LIMIT ?",
                (notifier, now, limit),
            )
            found += [Delivery(*row) for row in rows]
        return found

    def next_due_at(self, notifiers: Sequence[str]) -> float | None:
        """The earliest next attempt among pending rows of these notifiers."""
        if not notifiers:
            return None
        marks = ", ".join("?" for _ in notifiers)
        rows = self._read(
            f"SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'pending' AND notifier IN ({marks})",
            tuple(notifiers),
        )
        return rows[0][0] if rows else None

    def lane_batch(self, head: Delivery, *, limit: int = 1000) -> list[Delivery]:
        """The pending rows of the head's lane that came from the same poll, in event order."""
        rows = self._read(
            f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE state = 'pending' AND notifier = ? "
            "AND fine_tune_key = ? AND batch_id = ? ORDER BY event_seq LIMIT ?",
            (head.notifier, head.fine_tune_key, head.batch_id, limit),
        )
        return [Delivery(*row) for row in rows]

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
        """Record the outcome of one attempt at delivering these events to a notifier."""

        def write() -> None:
            self._db.executemany(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, next_attempt_at = ?, last_error = ?, "
                "last_status = ?, delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END "
                "WHERE event_id = ? AND notifier = ? AND state = 'pending'",
                [
                    (state, next_attempt_at, error, http_status, state, now, event_id, notifier)
                    for event_id in event_ids
                ],
            )

        self._write_tx(write)

    def deliveries_of(self, event_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        """The outbox rows of these events, by event id."""
        found: dict[str, list[Delivery]] = {event_id: [] for event_id in event_ids}
        for start in range(0, len(event_ids), 500):
            chunk = event_ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            for row in self._read(
                f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE event_id IN ({marks}) ORDER BY notifier",
                tuple(chunk),
            ):
                found[row[1]].append(Delivery(*row))
        return found

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
        """Queue events again: the dead rows (of one notifier; queued at or after `since`), or the named events
        (to every matching notifier, creating rows where `route` adds one). Returns how many rows were queued."""

        def write() -> int:
            count = 0
            if dead:
                where = "state = 'dead'"
                args: list[Any] = [now, now]
                if since is not None:
                    where += " AND queued_at >= ?"
                    args.append(since)
                if notifier is not None:
                    where += " AND notifier = ?"
                    args.append(notifier)
                count += self._db.execute(
                    "UPDATE deliveries SET state = 'pending', next_attempt_at = ?, queued_at = ?, attempts = 0 "
                    f"WHERE {where}",
                    args,
                ).rowcount
            for event_id in event_ids:
                row = self._db.execute(
                    "SELECT seq, envelope, fine_tune_key FROM events WHERE id = ?", (event_id,)
                ).fetchone()
                if row is None:
                    raise StoreError(f"no event with id {event_id}")
                seq, envelope, key = row
                targets = list(route(event_from_row(envelope, key))) if route else []
                if notifier is not None:
                    targets = [notifier]
                for target in targets:
                    count += self._db.execute(
                        "INSERT INTO deliveries (event_seq, event_id, notifier, fine_tune_key, batch_id, state, "
                        "attempts, next_attempt_at, queued_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?) "
                        "ON CONFLICT (event_id, notifier) DO UPDATE SET state = 'pending', attempts = 0, "
                        "next_attempt_at = excluded.next_attempt_at, queued_at = excluded.queued_at",
                        (seq, event_id, target, key, event_id, now, now),
                    ).rowcount
            return count

        return self._write_tx(write)

    def retire_notifiers(self, known: Sequence[str], *, now: float, reason: str = "notifier_removed") -> int:
        """Pending rows of notifiers not in `known` become dead with `reason` as their last error, so a removed
        notifier neither keeps the pending alerts firing nor floods stale events if its name returns.
        Returns how many rows were retired. (`now` is the time of the decision; rows keep their queue time,
        which `redeliver --dead --since` selects on.)"""
        marks = ", ".join("?" for _ in known)
        where = f"state = 'pending' AND notifier NOT IN ({marks})" if known else "state = 'pending'"

        def write() -> int:
            return self._db.execute(
                f"UPDATE deliveries SET state = 'dead', last_error = ?, next_attempt_at = NULL WHERE {where}",
                (reason, *known),
            ).rowcount

        return self._write_tx(write, what="retire removed notifiers")
