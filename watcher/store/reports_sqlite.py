"""The status page's reads from SQLite: a separate read-only connection, used from one worker thread.

In WAL mode a reader never blocks the writer (and the writer never blocks a reader), so rendering a page never
holds up a poll's commit. Each report runs in one read transaction: a consistent snapshot.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ..errors import StoreError
from ..models import Delivery, Event
from ..web.reports import CheckpointRow, EventRow, NotifierHealth, RunSummary

T = TypeVar("T")
SPARK_POINTS = 40
_DELIVERY_COLUMNS = (
    "event_seq, event_id, notifier, fine_tune_key, batch_id, state, attempts, next_attempt_at, queued_at, "
    "last_error, last_status"
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _thin(points: list[tuple[int, float]], most: int) -> tuple[tuple[int, float], ...]:
    """At most `most` points, evenly spaced, first and last kept (a sparkline shows the shape only)."""
    if len(points) <= most:
        return tuple(points)
    last = len(points) - 1
    return tuple(points[round(i * last / (most - 1))] for i in range(most))


class SqliteReports:
    """Read-only reports over the state database; checkpoint summaries are cached per fine-tune revision."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = str(path)
        self._busy_timeout_s = busy_timeout_s
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        # fine_tune_key -> (revision, summary of its checkpoints): rereads only the fine-tunes that changed
        self._cache: dict[str, tuple[int, dict[str, Any]]] = {}

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is None:
            if self.path == ":memory:" or not Path(self.path).exists():
                return None
            uri = f"file:{Path(self.path).resolve()}?mode=ro"
            try:
                self._db = sqlite3.connect(
                    uri, uri=True, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
                )
                self._db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            except sqlite3.Error as err:
                raise StoreError(f"cannot open state database {self.path} for reading: {err}") from err
        return self._db

    def _snapshot(self, fn: Callable[[sqlite3.Connection], T], empty: T) -> T:
        with self._lock:
            db = self._connect()
            if db is None:
                return empty
            try:
                db.execute("BEGIN")
                try:
                    return fn(db)
                finally:
                    db.execute("COMMIT")
            except sqlite3.OperationalError as err:
                if "no such table" in str(err):  # a database the daemon has not migrated yet
                    return empty
                raise StoreError(f"cannot read state: {err}") from err
            except sqlite3.Error as err:
                raise StoreError(f"cannot read state: {err}") from err

    # --- the overview -------------------------------------------------------------------------------

    def summaries(self, keys: Sequence[str]) -> dict[str, RunSummary]:
        """The condensed state of these fine-tunes (those never polled are absent)."""
        wanted = set(keys)
        return self._snapshot(lambda db: self._summaries(db, wanted), {})

    def _summaries(self, db: sqlite3.Connection, wanted: set[str]) -> dict[str, RunSummary]:
        found: dict[str, RunSummary] = {}
        rows = db.execute(
            "SELECT fine_tune_key, revision, last_poll_at, last_outcome, last_error, last_http_status, "
            "last_success_at, consecutive_failures, failing, not_found FROM fine_tunes"
        ).fetchall()
        try:  # the Hub status the lifecycle jobs persisted (absent in a database from before them)
            hub_statuses = dict(db.execute("SELECT fine_tune_key, status FROM lifecycle").fetchall())
        except sqlite3.OperationalError:
            hub_statuses = {}
        for key, revision, *state in rows:
            if key not in wanted:
                continue
            cached = self._cache.get(key)
            if cached is None or cached[0] != revision:
                cached = (revision, self._checkpoint_summary(db, key))
                self._cache[key] = cached
            poll_at, outcome, error, http_status, success_at, failures, failing, not_found = state
            found[key] = RunSummary(
                key=key,
                last_poll_at=poll_at,
                last_outcome=outcome,
                last_error=error,
                last_http_status=http_status,
                last_success_at=success_at,
                consecutive_failures=failures,
                failing=bool(failing),
                not_found=bool(not_found),
                hub_status="not found" if not_found else hub_statuses.get(key),
                **cached[1],
            )
        for key in [k for k in self._cache if k not in wanted]:
            del self._cache[key]
        return found

    @staticmethod
    def _checkpoint_summary(db: sqlite3.Connection, key: str) -> dict[str, Any]:
        # json_extract in SQLite: the overview never decodes whole checkpoints (inference samples can be big)
        rows = db.execute(
            "SELECT step, json_extract(data, '$.metrics.loss'), json_extract(data, '$.deployment_status'), "
            "json_extract(data, '$.created_at') FROM checkpoints WHERE fine_tune_key = ? ORDER BY step",
            (key,),
        ).fetchall()
        losses = [(step, loss) for step, raw, _, _ in rows if (loss := _number(raw)) is not None]
        best = min(losses, key=lambda point: point[1]) if losses else None
        latest = rows[-1] if rows else None
        return {
            "checkpoints": len(rows),
            "latest_step": latest[0] if latest else None,
            "latest_loss": _number(latest[1]) if latest else None,
            "latest_created_at": latest[3] if latest and isinstance(latest[3], str) else None,
            "latest_deployment": latest[2] if latest and isinstance(latest[2], str) else None,
            "best_loss": best[1] if best else None,
            "best_step": best[0] if best else None,
            "spark": _thin(losses, SPARK_POINTS),
        }

    # --- one run ------------------------------------------------------------------------------------

    def checkpoints(self, key: str) -> list[CheckpointRow]:
        """Every known checkpoint of a fine-tune, by step."""

        def read(db: sqlite3.Connection) -> list[CheckpointRow]:
            return [
                CheckpointRow(step, orjson.loads(data))
                for step, data in db.execute(
                    "SELECT step, data FROM checkpoints WHERE fine_tune_key = ? ORDER BY step", (key,)
                )
            ]

        return self._snapshot(read, [])

    # --- events and deliveries ----------------------------------------------------------------------

    def events(self, *, limit: int = 100, type: str | None = None, fine_tune: str | None = None) -> list[EventRow]:
        """Recent events, newest first, optionally only of one type and of one fine-tune."""

        def read(db: sqlite3.Connection) -> list[EventRow]:
            where, args = [], []
            if type is not None:
                where.append("type = ?")
                args.append(type)
            if fine_tune is not None:
                where.append("fine_tune_key = ?")
                args.append(fine_tune)
            clause = f"WHERE {' AND '.join(where)} " if where else ""
            rows = db.execute(
                f"SELECT seq, envelope, fine_tune_key, created_at FROM events {clause}ORDER BY seq DESC LIMIT ?",
                (*args, max(0, limit)),
            ).fetchall()
            deliveries: dict[str, list[Delivery]] = {}
            ids = [orjson.loads(envelope)["id"] for _, envelope, _, _ in rows]
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ", ".join("?" for _ in chunk)
                for row in db.execute(
                    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE event_id IN ({marks}) ORDER BY notifier",
                    chunk,
                ):
                    deliveries.setdefault(row[1], []).append(Delivery(*row))
            found = []
            for (seq, envelope, key, created_at), event_id in zip(rows, ids):
                doc = orjson.loads(envelope)
                event = Event(doc["id"], doc["type"], doc["timestamp"], doc["data"], key)
                found.append(EventRow(seq, event, created_at, tuple(deliveries.get(event_id, ()))))
            return found

        return self._snapshot(read, [])

    def delivery_health(self, notifiers: Sequence[str]) -> list[NotifierHealth]:
        """Pending and dead rows per configured notifier."""

        def read(db: sqlite3.Connection) -> list[NotifierHealth]:
            found = []
            for name in dict.fromkeys(notifiers):
                # per notifier and state: each query is a range of the deliveries_lane index
                pending, oldest = db.execute(
                    "SELECT COUNT(*), MIN(queued_at) FROM deliveries WHERE notifier = ? AND state = 'pending'",
                    (name,),
                ).fetchone()
                (dead,) = db.execute(
                    "SELECT COUNT(*) FROM deliveries WHERE notifier = ? AND state = 'dead'", (name,)
                ).fetchone()
                found.append(NotifierHealth(name, pending, oldest, dead))
            return found

        return self._snapshot(read, [NotifierHealth(name, 0, None, 0) for name in notifiers])

    def close(self) -> None:
        """Release the database."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
