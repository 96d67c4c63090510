"""The PostgreSQL store's outbox: due lane heads, batches, delivery outcomes, redelivery, stats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from watcher.core.models import Delivery, Event
from watcher.errors import StoreError
from watcher.store.postgres.base import PgBase, event_from_row
from watcher.store.protocols import Router

_DELIVERY_COLUMNS = (
    "event_seq, event_id, notifier, fine_tune_key, batch_id, state, attempts, next_attempt_at, queued_at, "
    "last_error, last_status"
)

# the lanes a replica delivers: every lane (NULL), those of the fine-tunes given, and with the flag those of
# fine-tunes no replica holds a live lease on (removed from every config, aged out of their source, released)
_SCOPE = (
    "(%s::text[] IS NULL OR {d}.fine_tune_key = ANY(%s::text[]) OR (%s::boolean AND NOT EXISTS (SELECT 1 FROM "
    "leases l WHERE l.fine_tune_key = {d}.fine_tune_key AND l.owner IS NOT NULL AND l.expires_at > now())))"
)
# a row still at its lane's head, as the dispatcher read it
_HEAD = (
    "EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = %s AND d.notifier = %s AND d.state = 'pending' "
    "AND d.attempts = %s AND d.event_seq = (SELECT MIN(h.event_seq) FROM deliveries h WHERE h.notifier = d.notifier "
    "AND h.state = 'pending' AND h.fine_tune_key = d.fine_tune_key))"
)


class PgOutbox(PgBase):
    """The outbox half of PostgresStore (same semantics as SqliteStore's)."""

    def due_deliveries(
        self,
        notifiers: Sequence[str],
        *,
        now: float,
        limit: int = 500,
        fine_tunes: Sequence[str] | None = None,
        unowned: bool = False,
    ) -> list[Delivery]:
        """The head of each (notifier, fine-tune) lane, when it is due; `limit` applies per notifier.

        `fine_tunes` limits the lanes to those fine-tunes (a replica delivers only the lanes it owns); with
        `unowned`, the lanes of fine-tunes no replica holds a live lease on come too (one replica delivers them).
        """
        found: list[Delivery] = []
        only = None if fine_tunes is None else list(fine_tunes)
        for notifier in notifiers:
            rows = self._read(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries d WHERE d.state = 'pending' AND d.notifier = %s "
                f"AND {_SCOPE.format(d='d')} "
                "AND d.event_seq = (SELECT MIN(h.event_seq) FROM deliveries h WHERE h.notifier = d.notifier "
                "AND h.state = 'pending' AND h.fine_tune_key = d.fine_tune_key) "
                "AND d.next_attempt_at <= %s ORDER BY d.next_attempt_at, d.event_seq LIMIT %s",
                (notifier, only, only, unowned, now, limit),
            )
            found += [Delivery(*row) for row in rows]
        return found

    def next_due_at(
        self, notifiers: Sequence[str], *, fine_tunes: Sequence[str] | None = None, unowned: bool = False
    ) -> float | None:
        """The earliest next attempt among pending rows of these notifiers (and of these fine-tunes, if given;
        with `unowned`, also of fine-tunes no replica holds a live lease on)."""
        if not notifiers:
            return None
        only = None if fine_tunes is None else list(fine_tunes)
        rows = self._read(
            "SELECT MIN(next_attempt_at) FROM deliveries d WHERE d.state = 'pending' AND d.notifier = ANY(%s) "
            f"AND {_SCOPE.format(d='d')}",
            (list(notifiers), only, only, unowned),
        )
        return rows[0][0] if rows else None

    def deliverable(self, head: Delivery, *, replica: str, epoch: int | None) -> float | None:
        """Whether `replica` may send this lane head now: the head is still its lane's head (pending, first, not
        attempted since it was read) and the replica holds the fine-tune's lease at `epoch`, or (`epoch` None) no
        replica holds a live lease on it and this one is the first live replica by name, which delivers such
        lanes. Returns for how many more seconds that holds at least (the lease's or heartbeat's expiry), or None.
        """
        # the database's clock decides, as for the leases themselves
        if epoch is not None:
            sql = (
                "SELECT extract(epoch FROM l.expires_at - now())::float8 FROM leases l WHERE l.fine_tune_key = %s "
                "AND l.owner = %s AND l.epoch = %s AND l.expires_at > now() AND " + _HEAD
            )
            args: tuple[Any, ...] = (head.fine_tune_key, replica, epoch)
        else:
            sql = (
                "SELECT extract(epoch FROM r.expires_at - now())::float8 FROM replicas r WHERE r.name = %s "
                "AND r.expires_at > now() "
                "AND NOT EXISTS (SELECT 1 FROM replicas o WHERE o.expires_at > now() AND o.name < r.name) "
                "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.fine_tune_key = %s AND l.owner IS NOT NULL "
                "AND l.expires_at > now()) AND " + _HEAD
            )
            args = (replica, head.fine_tune_key)
        rows = self._read(sql, (*args, head.event_id, head.notifier, head.attempts), what="check a delivery's lease")
        return rows[0][0] if rows else None

    def lane_batch(self, head: Delivery, *, limit: int = 1000) -> list[Delivery]:
        """The pending rows of the head's lane that came from the same poll, in event order."""
        rows = self._read(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE notifier = %s AND fine_tune_key = %s "
            "AND batch_id = %s AND state = 'pending' ORDER BY event_seq LIMIT %s",
            (head.notifier, head.fine_tune_key, head.batch_id, limit),
        )
        return [Delivery(*row) for row in rows]

    def events_by_id(self, event_ids: Sequence[str]) -> dict[str, Event]:
        """Committed events by id."""
        found: dict[str, Event] = {}
        if event_ids:
            rows = self._read("SELECT envelope, fine_tune_key FROM events WHERE id = ANY(%s)", (list(event_ids),))
            for envelope, key in rows:
                event = event_from_row(envelope, key)
                found[event.id] = event
        return found

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

        def write(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "UPDATE deliveries SET state = %s, attempts = attempts + 1, next_attempt_at = %s, last_error = %s, "
                "last_status = %s, delivered_at = CASE WHEN %s THEN %s ELSE delivered_at END "
                "WHERE event_id = ANY(%s) AND notifier = %s AND state = 'pending'",
                (state, next_attempt_at, error, http_status, state == "delivered", now, list(event_ids), notifier),
            )

        self._tx(write)

    def deliveries_of(self, event_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        """The outbox rows of these events, by event id."""
        found: dict[str, list[Delivery]] = {event_id: [] for event_id in event_ids}
        if event_ids:
            rows = self._read(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE event_id = ANY(%s) ORDER BY notifier",
                (list(event_ids),),
            )
            for row in rows:
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

        def write(conn: psycopg.Connection[Any]) -> int:
            count = 0
            # each event is locked (FOR SHARE) before its rows turn pending: a prune batch skips locked events, and
            # one that locked the event first is waited for, so no row is left pending without its event
            if dead:
                count += conn.execute(
                    "WITH held AS (SELECT e.id FROM events e WHERE e.id IN (SELECT event_id FROM deliveries "
                    "WHERE state = 'dead' AND (%s::text IS NULL OR notifier = %s::text) "
                    "AND (%s::float8 IS NULL OR queued_at >= %s::float8)) FOR SHARE) "
                    "UPDATE deliveries SET state = 'pending', next_attempt_at = %s, queued_at = %s, attempts = 0 "
                    "WHERE state = 'dead' AND event_id IN (SELECT id FROM held) "
                    "AND (%s::text IS NULL OR notifier = %s::text) AND (%s::float8 IS NULL OR queued_at >= %s::float8)",
                    (notifier, notifier, since, since, now, now, notifier, notifier, since, since),
                ).rowcount
            for event_id in event_ids:
                row = conn.execute(
                    "SELECT seq, envelope, fine_tune_key FROM events WHERE id = %s FOR SHARE", (event_id,)
                ).fetchone()
                if row is None:
                    raise StoreError(f"no event with id {event_id}")
                seq, envelope, key = row
                targets = list(route(event_from_row(envelope, key))) if route else []
                if notifier is not None:
                    targets = [notifier]
                for target in targets:
                    count += conn.execute(
                        "INSERT INTO deliveries (event_seq, event_id, notifier, fine_tune_key, batch_id, state, "
                        "attempts, next_attempt_at, queued_at) VALUES (%s, %s, %s, %s, %s, 'pending', 0, %s, %s) "
                        "ON CONFLICT (event_id, notifier) DO UPDATE SET state = 'pending', attempts = 0, "
                        "next_attempt_at = excluded.next_attempt_at, queued_at = excluded.queued_at",
                        (seq, event_id, target, key, event_id, now, now),
                    ).rowcount
            return count

        return self._tx(write)

    def retire_notifiers(self, known: Sequence[str], *, now: float, reason: str = "notifier_removed") -> int:
        """Pending rows of notifiers not in `known` become dead with `reason` as their last error (rows keep
        their queue time); returns how many."""

        def write(conn: psycopg.Connection[Any]) -> int:
            return conn.execute(
                "UPDATE deliveries SET state = 'dead', last_error = %s, next_attempt_at = NULL "
                "WHERE state = 'pending' AND NOT (notifier = ANY(%s))",
                (reason, list(known)),
            ).rowcount

        return self._tx(write, what="retire removed notifiers")
