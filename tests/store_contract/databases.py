"""The test's database read and changed beside the store, one class per implementation: what a contract test
checks in the tables themselves (nothing written, one transaction, no needless row writes, the schema version)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import psycopg

from watcher.store import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from watcher.store.postgres.schema import SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION

Rows = list[tuple[Any, ...]]


class Database(Protocol):
    """One implementation's tables, read and changed past the store."""

    schema_version: int  # the version this build of the store creates

    def snapshot(self) -> dict[str, Rows]:
        """Every row of the store's tables (with each row's physical id, so a rewrite shows)."""
        ...

    def event_rows(self) -> list[tuple[str, str, str]]:
        """(id, type, fine_tune_key) of every event, in sequence order."""
        ...

    def count_checkpoint_writes(self) -> Callable[[], dict[str, int]]:
        """Count every INSERT, UPDATE and DELETE of checkpoint rows from now on; returns a reader that resets."""
        ...

    def stored_versions(self) -> Rows:
        """The rows of the schema_version table."""
        ...

    def set_schema_version(self, version: int) -> None:
        """Write another schema version, as a newer (or older) release would have left it."""
        ...


class SqliteFile:
    """The SQLite store's file."""

    schema_version = SQLITE_SCHEMA_VERSION

    def __init__(self, path: Path) -> None:
        self.path = path

    def snapshot(self) -> dict[str, Rows]:
        with sqlite3.connect(self.path) as db:
            return {
                "fine_tunes": db.execute("SELECT rowid, * FROM fine_tunes ORDER BY fine_tune_key").fetchall(),
                "checkpoints": db.execute("SELECT rowid, * FROM checkpoints ORDER BY fine_tune_key, step").fetchall(),
                "events": db.execute("SELECT * FROM events ORDER BY seq").fetchall(),
            }

    def event_rows(self) -> list[tuple[str, str, str]]:
        with sqlite3.connect(self.path) as db:
            return db.execute("SELECT id, type, fine_tune_key FROM events ORDER BY seq").fetchall()

    def count_checkpoint_writes(self) -> Callable[[], dict[str, int]]:
        with sqlite3.connect(self.path) as db:
            db.executescript(
                """
                CREATE TABLE checkpoint_writes (op TEXT NOT NULL);
                CREATE TRIGGER count_cp_insert AFTER INSERT ON checkpoints BEGIN
                    INSERT INTO checkpoint_writes VALUES ('insert'); END;
                CREATE TRIGGER count_cp_update AFTER UPDATE ON checkpoints BEGIN
                    INSERT INTO checkpoint_writes VALUES ('update'); END;
                CREATE TRIGGER count_cp_delete AFTER DELETE ON checkpoints BEGIN
                    INSERT INTO checkpoint_writes VALUES ('delete'); END;
                """
            )

        def read() -> dict[str, int]:
            with sqlite3.connect(self.path) as db:
                rows = db.execute("SELECT op, COUNT(*) FROM checkpoint_writes GROUP BY op").fetchall()
                db.execute("DELETE FROM checkpoint_writes")
            return dict(rows)

        return read

    def stored_versions(self) -> Rows:
        with sqlite3.connect(self.path) as db:
            return db.execute("SELECT version FROM schema_version").fetchall()

    def set_schema_version(self, version: int) -> None:
        with sqlite3.connect(self.path) as db:
            db.execute("UPDATE schema_version SET version = ?", (version,))


class PostgresDatabase:
    """The PostgreSQL store's database, reached as a role that may do anything in it."""

    schema_version = POSTGRES_SCHEMA_VERSION

    def __init__(self, url: str) -> None:
        self.url = url

    def snapshot(self) -> dict[str, Rows]:
        with psycopg.connect(self.url) as db:
            return {
                "fine_tunes": db.execute("SELECT * FROM fine_tunes ORDER BY fine_tune_key").fetchall(),
                "checkpoints": db.execute("SELECT ctid, * FROM checkpoints ORDER BY fine_tune_key, step").fetchall(),
                "events": db.execute("SELECT * FROM events ORDER BY seq").fetchall(),
                "deliveries": db.execute("SELECT * FROM deliveries ORDER BY event_seq, notifier").fetchall(),
            }

    def event_rows(self) -> list[tuple[str, str, str]]:
        with psycopg.connect(self.url) as db:
            return db.execute("SELECT id, type, fine_tune_key FROM events ORDER BY seq").fetchall()

    def count_checkpoint_writes(self) -> Callable[[], dict[str, int]]:
        with psycopg.connect(self.url, autocommit=True) as db:
            db.execute("CREATE TABLE checkpoint_writes (op TEXT NOT NULL)")
            # SECURITY DEFINER: the trigger also counts the writes of a store whose role holds no grant on the table
            db.execute(
                "CREATE FUNCTION count_cp() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ BEGIN "
                "INSERT INTO checkpoint_writes VALUES (lower(TG_OP)); RETURN NULL; END $$"
            )
            db.execute("CREATE TRIGGER count_cp AFTER INSERT OR UPDATE OR DELETE ON checkpoints FOR EACH ROW "
                       "EXECUTE FUNCTION count_cp()")  # fmt: skip

        def read() -> dict[str, int]:
            with psycopg.connect(self.url, autocommit=True) as db:
                rows = db.execute("SELECT op, COUNT(*) FROM checkpoint_writes GROUP BY op").fetchall()
                db.execute("DELETE FROM checkpoint_writes")
            return dict(rows)

        return read

    def stored_versions(self) -> Rows:
        with psycopg.connect(self.url) as db:
            return db.execute("SELECT version FROM schema_version").fetchall()

    def set_schema_version(self, version: int) -> None:
        with psycopg.connect(self.url) as db:
            db.execute("UPDATE schema_version SET version = %s", (version,))
