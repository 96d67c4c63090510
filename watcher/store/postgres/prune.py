"""PostgreSQL retention: old events leave in small transactions; autovacuum makes their space reusable."""

from __future__ import annotations

from typing import Any

import psycopg

from watcher.core.health import LongOperation
from watcher.store.postgres.base import PgBase
from watcher.store.protocols import PruneReport

# The events a pass may delete: older than the cutoff, and with no delivery still pending (that event must
# stay until it is delivered or dead, whatever its age).
_OLD = (
    "FROM events e WHERE e.created_at < %s AND NOT EXISTS "
    "(SELECT 1 FROM deliveries p WHERE p.event_id = e.id AND p.state = 'pending')"
)


class PgPrune(PgBase):
    """The retention half of PostgresStore.

    `bytes_freed` is the size of the deleted rows (pg_column_size): PostgreSQL keeps the pages and reuses them
    after autovacuum, so the files do not shrink.
    """

    # no rewrite here (autovacuum works beside the polls): never a long operation on the store's thread
    long_operation: LongOperation | None = None

    def prune(
        self,
        *,
        now: float,
        retain_s: float,
        batch: int = 500,
        dry_run: bool = False,
        max_batches: int | None = None,
    ) -> PruneReport:
        """Delete events older than `retain_s` (never one with a pending delivery) with their delivered and dead
        rows, `batch` events per short transaction; `max_batches` bounds the transactions of this call."""
        cutoff = now - retain_s
        if dry_run:
            [(events, event_bytes)] = self._read(
                f"SELECT COUNT(*), COALESCE(SUM(pg_column_size(e.*)), 0) {_OLD}", (cutoff,), what="read old events"
            )
            [(deliveries, delivery_bytes)] = self._read(
                "SELECT COUNT(*), COALESCE(SUM(pg_column_size(d.*)), 0) FROM deliveries d "
                f"WHERE d.state != 'pending' AND d.event_id IN (SELECT e.id {_OLD})",
                (cutoff,),
                what="read old deliveries",
            )
            return PruneReport(events=events, deliveries=deliveries, bytes_freed=int(event_bytes + delivery_bytes))
        total = PruneReport(done=False)
        steps = 0
        while max_batches is None or steps < max_batches:
            report = self._tx(lambda conn: _delete_batch(conn, cutoff, batch), what="prune old events")
            steps += 1
            total = total + report
            if report.events < batch:
                return PruneReport(total.events, total.deliveries, total.bytes_freed, True)
        return PruneReport(total.events, total.deliveries, total.bytes_freed, False)


def _delete_batch(conn: psycopg.Connection[Any], cutoff: float, batch: int) -> PruneReport:
    # SKIP LOCKED: a batch never waits on (nor deadlocks with) a poll or a delivery touching the same rows
    rows = conn.execute(
        f"SELECT e.seq, e.id, pg_column_size(e.*) {_OLD} ORDER BY e.created_at LIMIT %s FOR UPDATE OF e SKIP LOCKED",
        (cutoff, batch),
    ).fetchall()
    if not rows:
        return PruneReport(done=False)
    ids = [event_id for _, event_id, _ in rows]
    deleted = conn.execute(
        "DELETE FROM deliveries WHERE event_id = ANY(%s) AND state != 'pending' RETURNING pg_column_size(deliveries.*)",
        (ids,),
    ).fetchall()
    conn.execute("DELETE FROM events WHERE seq = ANY(%s)", ([seq for seq, _, _ in rows],))
    freed = sum(size for _, _, size in rows) + sum(size for (size,) in deleted)
    return PruneReport(events=len(rows), deliveries=len(deleted), bytes_freed=int(freed), done=False)
