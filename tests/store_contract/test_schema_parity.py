"""The two schemas hold the same indexes: every table both stores have is indexed alike (columns, in order, and the
partial predicate), read from the live catalogs of a freshly migrated database of each (sqlite_master, pg_indexes).

A query written once for both stores relies on the same index on each; an index added to one schema only (as
SQLite's retention indexes once were) makes the other scan whole tables as its history grows.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import psycopg

from watcher.store import SqliteStore
from watcher.store.postgres.store import PostgresStore

# ON [schema.]table [USING method] (columns) [WHERE predicate]
_INDEX = re.compile(r"\bON\s+(?:\w+\.)?(\w+)\s*(?:USING\s+\w+\s*)?\(([^)]*)\)\s*(?:WHERE\s+(.*))?$", re.S | re.I)

Indexes = dict[str, set[tuple[tuple[str, ...], str]]]


def _parsed(definitions: list[str]) -> Indexes:
    """table -> {(columns, predicate)} from CREATE INDEX statements of either dialect."""
    found: Indexes = {}
    for sql in definitions:
        match = _INDEX.search(" ".join(sql.split()))
        assert match, f"cannot read the index definition {sql!r}"
        table, columns, predicate = match.groups()
        # PostgreSQL writes the predicate back as (state = 'pending'::text)
        where = re.sub(r"::\w+|[()]", "", predicate or "")
        key = (tuple(column.strip().lower() for column in columns.split(",")), " ".join(where.lower().split()))
        found.setdefault(table.lower(), set()).add(key)
    return found


def _sqlite_indexes(path: Path) -> tuple[Indexes, set[str]]:
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        # sql is NULL for the indexes behind PRIMARY KEY and UNIQUE: constraints, compared as the tables are
        definitions = [sql for (sql,) in db.execute("SELECT sql FROM sqlite_master WHERE type = 'index'") if sql]
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return _parsed(definitions), tables


def _postgres_indexes(url: str) -> tuple[Indexes, set[str]]:
    PostgresStore(url).close()
    with psycopg.connect(url) as conn:
        definitions = [
            indexdef
            for (indexdef,) in conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() "
                "AND indexname NOT IN (SELECT conname FROM pg_constraint)"  # PRIMARY KEY and UNIQUE, as above
            )
        ]
        tables = {
            name for (name,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        }
    return _parsed(definitions), tables


def test_both_schemas_index_their_common_tables_alike(tmp_path: Path, pg_url: str) -> None:
    sqlite, sqlite_tables = _sqlite_indexes(tmp_path / "parity.db")
    postgres, postgres_tables = _postgres_indexes(pg_url)
    common = (sqlite_tables & postgres_tables) - {"schema_version"}
    assert {"events", "deliveries", "fine_tunes", "checkpoints"} <= common
    assert sqlite.get("events"), "no index read from sqlite_master: the reader is broken"
    for table in sorted(common):
        assert sqlite.get(table, set()) == postgres.get(table, set()), (
            f"{table}: only in SQLite {sorted(sqlite.get(table, set()) - postgres.get(table, set()))}, "
            f"only in PostgreSQL {sorted(postgres.get(table, set()) - sqlite.get(table, set()))}"
        )
