"""SQLite retention: old events leave in small transactions, then the file gives the space back."""

from __future__ import annotations

import sqlite3
import time

import structlog

from watcher.core.health import LongOperation
from watcher.errors import StoreError
from watcher.store.protocols import PruneReport
from watcher.store.sqlite.base import REWRITE_MAX_BYTES, SqliteBase

log = structlog.get_logger("watcher.store")

# Pages handed back to the file system per incremental_vacuum step (4 MiB at the default page size): one short
# write each, so a poll waits for at most one step.
VACUUM_STEP_PAGES = 1024

# When the free pages are at least this share of the file (and this many), the file is rewritten instead.
FULL_REWRITE_SHARE = 0.25
FULL_REWRITE_MIN_PAGES = 2048

# How long a rewrite is expected to take at most, from the live bytes it copies: measured at about 20 MiB/s on a
# busy 2-core machine (360 MiB in 17 s); health allows five times that and a minute more before calling it stuck.
REWRITE_BYTES_PER_S = 4 * 1024 * 1024
REWRITE_FLOOR_S = 60.0

# The events a pass may delete: older than the cutoff, and with no delivery still pending (that event must
# stay until it is delivered or dead, whatever its age).
_OLD = (
    "FROM events e WHERE e.created_at < ? AND NOT EXISTS "
    "(SELECT 1 FROM deliveries p WHERE p.event_id = e.id AND p.state = 'pending')"
)


class SqlitePrune(SqliteBase):
    """The retention half of the SQLite store (a mixin of SqliteStore)."""

    _rewrite_deferred = False
    # set on the store's thread for the length of a rewrite; the daemon's health reads it from the event loop
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
        rows, `batch` events per short transaction, then give the space back to the file system.

        Checkpoints and per-fine-tune state are never touched. `max_batches` bounds the transactions of this
        call (deletions, then vacuum steps), so a caller sharing the store's thread with polls can interleave;
        the report says whether work is left (`done`). A dry run deletes nothing and estimates the bytes.
        """
        cutoff = now - retain_s
        if dry_run:
            return self._estimate(cutoff)
        page_size = self._pragma("page_size")
        pages_before = self._pragma("page_count")
        events = deliveries = steps = 0
        done = False
        while max_batches is None or steps < max_batches:
            removed, rows = self._write_tx(lambda: self._delete_batch(cutoff, batch), what="prune old events")
            steps += 1 if removed else 0  # finding nothing left is a read: the budget goes to the vacuum
            events += removed
            deliveries += rows
            if removed < batch:
                done = True
                break
        if done:
            done = self._give_back(
                bounded=max_batches is not None, budget=None if max_batches is None else max_batches - steps
            )
        freed = max(0, pages_before - self._pragma("page_count")) * page_size
        return PruneReport(events=events, deliveries=deliveries, bytes_freed=freed, done=done)

    def _give_back(self, *, bounded: bool, budget: int | None) -> bool:
        """Hand the freed pages back to the file system; False when a bounded pass ran out of budget."""
        free, pages = self._pragma("freelist_count"), self._pragma("page_count")
        if free >= FULL_REWRITE_MIN_PAGES and free >= pages * FULL_REWRITE_SHARE:
            # After a large prune (the first one on a long history), moving the live tail page by page into a
            # huge free list is far slower than rewriting the live data once.
            live_bytes = (pages - free) * self._pragma("page_size")
            if bounded and live_bytes > REWRITE_MAX_BYTES:
                if not self._rewrite_deferred:  # once per process: new rows reuse the space meanwhile
                    log.warning(
                        "store.vacuum_deferred",
                        free_bytes=free * self._pragma("page_size"),
                        hint="run `oxen-watcher prune` to give the space back; until then new rows reuse it",
                    )
                self._rewrite_deferred = True
                return True
            self._rewrite(live_bytes)
            return True
        while self._pragma("freelist_count") > 0:
            if budget is not None and budget <= 0:
                return False
            # executescript steps the pragma to completion; execute() would free a single page
            self._run(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})")
            budget = None if budget is None else budget - 1
        return True

    def _rewrite(self, live_bytes: int) -> None:
        """VACUUM, announced as a planned long operation: it holds the store's thread (and every writer) for
        seconds to minutes, which health must tell from a wedged loop."""
        expected_s = REWRITE_FLOOR_S + live_bytes / REWRITE_BYTES_PER_S
        operation = LongOperation.begin(f"compacting the state database, {live_bytes >> 20} MiB", expected_s=expected_s)
        log.info("store.long_operation", what=operation.what, expected_s=round(expected_s))
        self.long_operation = operation
        try:
            self._run("VACUUM")
        finally:
            self.long_operation = None
            seconds = round(time.monotonic() - operation.started_at, 1)
            log.info("store.long_operation_ended", what=operation.what, seconds=seconds)

    def _delete_batch(self, cutoff: float, batch: int) -> tuple[int, int]:
        rows = self._db.execute(f"SELECT e.seq, e.id {_OLD} ORDER BY e.created_at LIMIT ?", (cutoff, batch)).fetchall()
        deliveries = 0
        for start in range(0, len(rows), 500):
            chunk = rows[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            deliveries += self._db.execute(
                f"DELETE FROM deliveries WHERE event_id IN ({marks}) AND state != 'pending'",
                [event_id for _, event_id in chunk],
            ).rowcount
            self._db.execute(f"DELETE FROM events WHERE seq IN ({marks})", [seq for seq, _ in chunk])
        return len(rows), deliveries

    def _estimate(self, cutoff: float) -> PruneReport:
        # Row payload plus a fixed allowance per row for its record header and index entries: close to what
        # the pages would free (within about a quarter in the tests), without writing anything.
        [(events, event_bytes)] = self._read(
            "SELECT COUNT(*), COALESCE(SUM(length(e.envelope) + 2 * length(e.id) + 2 * length(e.type) "
            f"+ 2 * length(e.fine_tune_key) + 64), 0) {_OLD}",
            (cutoff,),
            what="read old events",
        )
        [(deliveries, delivery_bytes)] = self._read(
            "SELECT COUNT(*), COALESCE(SUM(2 * length(d.event_id) + 2 * length(d.notifier) + length(d.fine_tune_key) "
            "+ length(d.batch_id) + COALESCE(length(d.last_error), 0) + 64), 0) "
            f"FROM deliveries d WHERE d.event_id IN (SELECT e.id {_OLD})",
            (cutoff,),
            what="read old deliveries",
        )
        return PruneReport(events=events, deliveries=deliveries, bytes_freed=event_bytes + delivery_bytes)

    def _run(self, statement: str) -> None:
        try:
            self._db.executescript(statement)
        except sqlite3.Error as err:
            raise StoreError(f"cannot give space back to the file system: {err}") from err
