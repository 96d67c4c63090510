"""The status page's reads from SQLite: a separate read-only connection, used from one worker thread.

In WAL mode a reader never blocks the writer (and the writer never blocks a reader), so rendering a page never
holds up a poll's commit. Each report runs in one read transaction: a consistent snapshot. The queries are shared
with PostgreSQL (store/pages.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from watcher.errors import StoreError
from watcher.store.pages import Reader, SqlReports

T = TypeVar("T")


class SqliteReports(SqlReports):
    """Read-only reports over the state database; checkpoint summaries are cached per fine-tune revision."""

    mark = "?"
    # json_extract in SQLite: the overview never decodes whole checkpoints (inference samples can be big)
    checkpoint_fields = (
        "step, json_extract(data, '$.metrics.loss'), json_extract(data, '$.deployment_status'), "
        "json_extract(data, '$.created_at')"
    )

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        super().__init__()
        self.path = str(path)
        self._busy_timeout_s = busy_timeout_s
        self._db: sqlite3.Connection | None = None

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

    def _snapshot(self, fn: Callable[[Reader], T], empty: T) -> T:
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

    def _hub_statuses(self, db: Reader) -> dict[str, str]:
        try:
            return super()._hub_statuses(db)
        except sqlite3.OperationalError:  # a database from before the lifecycle jobs (no such table)
            return {}

    def close(self) -> None:
        """Release the database."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
