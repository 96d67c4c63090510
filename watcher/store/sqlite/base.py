"""What every part of the SQLite store shares: the connection and its two ways in (a read, a short write)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from watcher.errors import StoreError

T = TypeVar("T")

# A rewrite of the whole file (VACUUM) blocks every writer while it runs: the daemon does one only when the live
# data is at most this big (a pause of seconds); `oxen-watcher prune` does it at any size.
REWRITE_MAX_BYTES = 512 * 1024 * 1024

DELIVERY_COLUMNS = (
    "event_seq, event_id, notifier, fine_tune_key, batch_id, state, attempts, next_attempt_at, queued_at, "
    "last_error, last_status"
)


class SqliteBase:
    """The connection (autocommit: every transaction is explicit) and its read and write helpers."""

    _db: sqlite3.Connection

    def _write_tx(self, fn: Callable[[], T], *, what: str = "write the outbox") -> T:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                value = fn()
                self._db.execute("COMMIT")
                return value
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise StoreError(f"cannot {what}: {err}") from err

    def _update_each(self, sql: str, rows: Sequence[Sequence[Any]], *, what: str) -> list[int]:
        """Run one statement per row in one write transaction; each row's rowcount."""
        return self._write_tx(lambda: [self._db.execute(sql, row).rowcount for row in rows], what=what)

    def _read(self, sql: str, args: Sequence[Any] = (), *, what: str = "read the outbox") -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as err:
            raise StoreError(f"cannot {what}: {err}") from err

    def _pragma(self, name: str) -> int:
        return int(self._read(f"PRAGMA {name}", what=f"read {name}")[0][0])
