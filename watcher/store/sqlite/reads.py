"""The SQLite store's reads: per fine-tune status and committed events, for `status`, `events` and metrics."""

from __future__ import annotations

import fnmatch
import heapq
import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson

from watcher.core.models import Event, FineTuneStatus
from watcher.errors import StoreError
from watcher.store.rows import STATUS_COLUMNS, event_from_row, status_of
from watcher.store.sqlite.base import SqliteBase

STATUS_BATCH = 500  # keys per IN (...): well under SQLite's bound on parameters


class SqliteReads(SqliteBase):
    """Status rows and event reads; none of them writes."""

    def statuses(self, keys: Sequence[str] | None = None) -> list[FineTuneStatus]:
        """Per fine-tune status (those in `keys`, in that order, or all), for `status` and metrics."""
        try:
            if keys is None:
                rows = {row[0]: row for row in self._db.execute(f"SELECT {STATUS_COLUMNS} FROM fine_tunes")}
            else:  # only theirs: a poll refreshing one fine-tune's gauges must not read every row (start-up was
                # quadratic in the number of fine-tunes)
                rows = {}
                unique = list(dict.fromkeys(keys))
                for start in range(0, len(unique), STATUS_BATCH):
                    batch = unique[start : start + STATUS_BATCH]
                    marks = ", ".join("?" for _ in batch)
                    rows.update(
                        (row[0], row)
                        for row in self._db.execute(
                            f"SELECT {STATUS_COLUMNS} FROM fine_tunes WHERE fine_tune_key IN ({marks})", batch
                        )
                    )
            wanted = list(keys) if keys is not None else sorted(rows)
            return [self._status(key, rows.get(key)) for key in wanted]
        except sqlite3.Error as err:
            raise StoreError(f"cannot read state: {err}") from err

    def _status(self, key: str, row: tuple[Any, ...] | None) -> FineTuneStatus:
        checkpoints = [
            (step, orjson.loads(data))
            for step, data in self._db.execute(
                "SELECT step, data FROM checkpoints WHERE fine_tune_key = ? ORDER BY step", (key,)
            )
        ]
        return status_of(key, row, checkpoints)

    def recent_events(self, *, limit: int = 50, type_glob: str | None = None) -> list[Event]:
        """Committed events, newest first, optionally only those whose type matches a glob (fnmatch rules,
        case-sensitive). The glob is matched against the few distinct types; each matching type's newest rows
        then come from the (type, seq) index, so a rare type costs as little as a common one."""
        if limit <= 0:
            return []
        if type_glob is None:
            rows = self._read(
                "SELECT seq, envelope, fine_tune_key FROM events ORDER BY seq DESC LIMIT ?",
                (limit,),
                what="read events",
            )
        else:
            # the newest seqs of each matching type straight from the (type, seq) index, then only the
            # envelopes of the `limit` newest overall
            seqs: list[int] = []
            for kind in self._event_types():
                if fnmatch.fnmatchcase(kind, type_glob):
                    seqs += [
                        seq
                        for (seq,) in self._read(
                            "SELECT seq FROM events WHERE type = ? ORDER BY seq DESC LIMIT ?",
                            (kind, limit),
                            what="read events",
                        )
                    ]
            newest = heapq.nlargest(limit, seqs)
            if newest and newest[0] - newest[-1] < 4 * limit:
                # the matches are dense (the usual case): one walk down the table reads them in order
                rows = self._read(
                    "SELECT seq, envelope, fine_tune_key FROM events WHERE seq BETWEEN ? AND ? ORDER BY seq DESC",
                    (newest[-1], newest[0]),
                    what="read events",
                )
                wanted = set(newest)
                rows = [row for row in rows if row[0] in wanted]
            else:
                marks = ", ".join("?" for _ in newest)
                rows = self._read(
                    f"SELECT seq, envelope, fine_tune_key FROM events WHERE seq IN ({marks}) ORDER BY seq DESC",
                    newest,
                    what="read events",
                )
        return [event_from_row(envelope, key) for _, envelope, key in rows]

    def _event_types(self) -> list[str]:
        """The distinct event types, one index seek each (a loose index scan)."""
        found: list[str] = []
        while True:
            where, args = ("WHERE type > ?", (found[-1],)) if found else ("", ())
            rows = self._read(f"SELECT type FROM events {where} ORDER BY type LIMIT 1", args, what="read event types")
            if not rows:
                return found
            found.append(rows[0][0])

    def events_after(self, seq: int, *, limit: int = 1000) -> list[tuple[int, Event]]:
        """Committed events with a sequence number above `seq`, oldest first."""
        try:
            rows = self._db.execute(
                "SELECT seq, envelope, fine_tune_key FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            ).fetchall()
        except sqlite3.Error as err:
            raise StoreError(f"cannot read events: {err}") from err
        return [(s, event_from_row(envelope, key)) for s, envelope, key in rows]

    def events_by_id(self, event_ids: Sequence[str]) -> dict[str, Event]:
        """Committed events by id."""
        found: dict[str, Event] = {}
        for start in range(0, len(event_ids), 500):
            chunk = event_ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            for envelope, key in self._read(
                f"SELECT envelope, fine_tune_key FROM events WHERE id IN ({marks})", tuple(chunk), what="read events"
            ):
                event = event_from_row(envelope, key)
                found[event.id] = event
        return found
