"""The SQLite store's schema: versioned migrations, and the one-time switch to incremental auto_vacuum."""

from __future__ import annotations

import sqlite3
import time

import structlog

from watcher.errors import StoreError
from watcher.store.sqlite.base import REWRITE_MAX_BYTES, SqliteBase
from watcher.store.sqlite.schema import MIGRATIONS, SCHEMA_VERSION

log = structlog.get_logger("watcher.store")

# Converting an older database to incremental auto_vacuum rewrites the file (VACUUM), which takes minutes for
# a file of gigabytes. At a daemon's start only a file up to this size is converted, so start-up stays within
# systemd's start timeout; `oxen-watcher prune` converts any size. Until then pruned pages are reused, not
# given back.
CONVERT_AT_START_MAX_BYTES = REWRITE_MAX_BYTES


class SqliteMigrations(SqliteBase):
    """Creates and upgrades the schema; refuses a database newer than this release."""

    path: str

    def _version(self) -> int:
        exists = self._db.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()[0]
        if not exists:
            return 0
        row = self._db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _check_version(self) -> None:
        version = self._version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"state database {self.path} has schema version {version}, newer than this release "
                f"({SCHEMA_VERSION}): upgrade oxen-watcher"
            )

    def _migrate(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = self._version()
            self._check_version()
            if not self._db.execute("SELECT 1 FROM schema_version").fetchone():
                self._db.execute("INSERT INTO schema_version (version) VALUES (0)")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    statement(self._db) if callable(statement) else self._db.execute(statement)
            self._db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _convert_to_incremental_vacuum(self, *, max_bytes: int | None) -> None:
        """Give a database created before retention `auto_vacuum = INCREMENTAL`, so pruning can shrink it.

        Only a VACUUM (outside any transaction) changes the mode of a database that has tables; it rewrites the
        file once. If it cannot run now (another process is busy with the file, the disk is full), the store
        works as before and the next start tries again.
        """
        if self.path == ":memory:" or self._pragma("auto_vacuum") == 2:
            return
        size = self._pragma("page_count") * self._pragma("page_size")
        if max_bytes is not None and size > max_bytes:
            log.warning(
                "store.conversion_deferred",
                change="auto_vacuum = INCREMENTAL",
                size_bytes=size,
                hint="run `oxen-watcher prune` once to convert it (it rewrites the file); until then pruned space "
                "is reused but not given back",
            )
            return
        log.info("store.converting", change="auto_vacuum = INCREMENTAL", reason="retention can shrink the file")
        started = time.monotonic()
        try:
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("VACUUM")
        except sqlite3.OperationalError as err:
            log.warning("store.conversion_deferred", error=str(err), hint="tried again at the next start")
            return
        log.info("store.converted", change="auto_vacuum = INCREMENTAL", seconds=round(time.monotonic() - started, 3))

    @property
    def auto_vacuum(self) -> str:
        """The database's auto_vacuum mode: none, full or incremental."""
        return ("none", "full", "incremental")[self._pragma("auto_vacuum")]

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        return self._version()
