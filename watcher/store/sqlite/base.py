"""What every part of the SQLite store shares: the connection and its two ways in (a read, a short write)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import structlog

from watcher.errors import StoreError

log = structlog.get_logger("watcher.store")

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
    path: str
    # the transaction under way inserted events: its COMMIT is made durable against power loss (_commit)
    _events_written = False
    _wal_fd: int | None = None

    def _write_tx(self, fn: Callable[[], T], *, what: str = "write the outbox") -> T:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._events_written = False
            try:
                value = fn()
                self._commit()
                return value
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise StoreError(f"cannot {what}: {err}") from err

    def _commit(self) -> None:
        """COMMIT; one that carries events is also synced to disk, as `synchronous = FULL` syncs every commit.

        The connection runs `synchronous = NORMAL` (WAL mode): safe against a crash of the process, but a power
        loss can roll back the last commits, and an event rolled back is announced again by the next poll under a
        new id (its receiver cannot tell it is the same). FULL cannot be set for one transaction, and for every
        commit it costs a sync per failed poll (2,000 fine-tunes during a Hub outage: 200 a second); so a commit
        with events syncs the write-ahead log after it, which is what FULL does (bench/durability.py)."""
        self._db.execute("COMMIT")
        if not self._events_written or self.path == ":memory:":
            return
        self._events_written = False
        try:
            if self._wal_fd is None:
                self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY)
            os.fsync(self._wal_fd)
        except OSError as err:  # committed all the same; only as durable as NORMAL makes it
            log.warning("store.sync_failed", error=str(err))

    def _close_wal(self) -> None:
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

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
