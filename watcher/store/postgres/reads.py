"""The PostgreSQL store's reads: per fine-tune status and committed events (newest first, or after a cursor)."""

from __future__ import annotations

import fnmatch
import heapq
from collections.abc import Sequence
from typing import Any

import orjson
import psycopg

from watcher.core.models import Event, FineTuneStatus
from watcher.store.postgres.base import PgBase
from watcher.store.rows import STATUS_COLUMNS, event_from_row, status_of

# the distinct event types, one index seek each (a loose scan of the (type, seq) index)
# the distinct types by a skip scan of the (type, seq) index from its top end: each step lands on a type's newest
# row, which retention never deleted; from the bottom end each step landed on the oldest, walking past every index
# entry of the rows retention deleted (dead until a vacuum) before it found a live one
_EVENT_TYPES = (
    "WITH RECURSIVE t(type) AS ((SELECT type FROM events ORDER BY type DESC, seq DESC LIMIT 1) UNION ALL "
    "SELECT (SELECT e.type FROM events e WHERE e.type < t.type ORDER BY e.type DESC, e.seq DESC LIMIT 1) FROM t "
    "WHERE t.type IS NOT NULL) SELECT type FROM t WHERE type IS NOT NULL"
)


def _recent_of_types(conn: psycopg.Connection[Any], limit: int, type_glob: str) -> list[Event]:
    """As on SQLite: the glob is matched against the few distinct types, each matching type's newest rows come
    from the (type, seq) index, then only the envelopes of the `limit` newest overall (a rare type costs as little
    as a common one; reading newest first and filtering walked the whole table for a rare one)."""
    if limit <= 0:
        return []
    seqs: list[int] = []
    for (kind,) in conn.execute(_EVENT_TYPES).fetchall():
        if fnmatch.fnmatchcase(kind, type_glob):
            seqs += [
                seq
                for (seq,) in conn.execute(
                    "SELECT seq FROM events WHERE type = %s ORDER BY seq DESC LIMIT %s", (kind, limit)
                )
            ]
    newest = heapq.nlargest(limit, seqs)
    if not newest:
        return []
    rows = conn.execute(
        "SELECT envelope, fine_tune_key FROM events WHERE seq = ANY(%s) ORDER BY seq DESC", (newest,)
    ).fetchall()
    return [event_from_row(envelope, key) for envelope, key in rows]


class PgReports(PgBase):
    """The read-only reports of PostgresStore (same results as SqliteStore's)."""

    def statuses(self, keys: Sequence[str] | None = None) -> list[FineTuneStatus]:
        """Per fine-tune status (those in `keys`, in that order, or all), for `status` and metrics."""

        def read(conn: psycopg.Connection[Any]) -> list[FineTuneStatus]:
            if keys is None:
                rows = {row[0]: row for row in conn.execute(f"SELECT {STATUS_COLUMNS} FROM fine_tunes")}
            else:  # only theirs: a poll refreshing one fine-tune's gauges must not read every row
                found = conn.execute(
                    f"SELECT {STATUS_COLUMNS} FROM fine_tunes WHERE fine_tune_key = ANY(%s)", (list(keys),)
                )
                rows = {row[0]: row for row in found}
            wanted = list(keys) if keys is not None else sorted(rows)
            checkpoints: dict[str, list[tuple[int, Any]]] = {key: [] for key in wanted}
            for key, step, data in conn.execute(
                "SELECT fine_tune_key, step, data FROM checkpoints WHERE fine_tune_key = ANY(%s) "
                "ORDER BY fine_tune_key, step",
                (wanted,),
            ):
                checkpoints[key].append((step, orjson.loads(data)))
            return [status_of(key, rows.get(key), checkpoints[key]) for key in wanted]

        return self._tx(read, what="read state", bounded=False)  # not under a lease: parsing may take long

    def recent_events(self, *, limit: int = 50, type_glob: str | None = None) -> list[Event]:
        """Committed events, newest first, optionally only those whose type matches a glob."""
        if type_glob is not None:
            return self._tx(lambda conn: _recent_of_types(conn, limit, type_glob), what="read events")
        found: list[Event] = []
        below = None
        while len(found) < limit:
            page = self._read(
                "SELECT seq, envelope, fine_tune_key, type FROM events WHERE (%s::bigint IS NULL OR seq < %s::bigint) "
                "ORDER BY seq DESC LIMIT 500",
                (below, below),
                what="read events",
            )
            for _, envelope, key, _kind in page:
                found.append(event_from_row(envelope, key))
                if len(found) >= limit:
                    break
            if len(page) < 500:
                break
            below = page[-1][0]
        return found

    def events_after(self, seq: int, *, limit: int = 1000) -> list[tuple[int, Event]]:
        """Committed events with a sequence number above `seq`, oldest first.

        Only events of transactions older than every transaction still in progress are returned: those are all
        final, so an event committed later can never sort below what a reader has already seen.
        """
        rows = self._read(
            "SELECT seq, envelope, fine_tune_key FROM events WHERE seq > %s "
            "AND xid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY seq LIMIT %s",
            (seq, limit),
            what="read events",
        )
        return [(s, event_from_row(envelope, key)) for s, envelope, key in rows]
