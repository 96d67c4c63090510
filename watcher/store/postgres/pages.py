"""The status page's reads from PostgreSQL: the same queries as SQLite (store/pages.py), over the store's pool.

Every replica serves the page from the shared database, so it shows every fine-tune whichever replica polls it.
Each report runs in one read-only REPEATABLE READ transaction: a consistent snapshot, as on SQLite. Statements are
sent unprepared (the pool's connections never prepare), so PgBouncer in transaction mode works; errors are
wrapped without any part of the database URL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from watcher.store.pages import Reader, SqlReports
from watcher.store.postgres.base import store_error

T = TypeVar("T")


class PostgresReports(SqlReports):
    """Read-only reports over the shared database; checkpoint summaries are cached per fine-tune revision."""

    mark = "%s"
    # as json_extract gives them on SQLite: the loss when it is a JSON number, the others when strings. Each
    # checkpoint's text is parsed once (OFFSET 0 keeps the planner from inlining the cast into every use of `j`:
    # measured 5x slower) and nothing is decoded in Python (inference samples can be big)
    checkpoint_fields = (
        "step, CASE WHEN jsonb_typeof(j #> '{metrics,loss}') = 'number' THEN (j #>> '{metrics,loss}')::float8 END, "
        "CASE WHEN jsonb_typeof(j -> 'deployment_status') = 'string' THEN j ->> 'deployment_status' END, "
        "CASE WHEN jsonb_typeof(j -> 'created_at') = 'string' THEN j ->> 'created_at' END"
    )
    checkpoint_from = "checkpoints CROSS JOIN LATERAL (SELECT data::jsonb AS j OFFSET 0) AS parsed"

    def __init__(self, pool: ConnectionPool, *, owns_pool: bool = False) -> None:
        super().__init__()
        self._pool = pool
        self._owns_pool = owns_pool  # the daemon's pages share the store's pool, which the store closes

    def _snapshot(self, fn: Callable[[Reader], T], empty: T) -> T:
        with self._lock:
            try:
                with self._pool.connection() as conn, conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    return fn(conn)
            except psycopg.Error as err:
                raise store_error("cannot read state", err) from err

    def _in(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        return f"{column} = ANY({self.mark})", [list(values)]

    def _replicas(self, db: Reader) -> dict[str, str]:
        # leases live; an expired one's fine-tune is unowned until another replica claims it (the database's clock)
        return dict(
            db.execute(
                "SELECT fine_tune_key, owner FROM leases WHERE owner IS NOT NULL AND expires_at > now()"
            ).fetchall()
        )

    def close(self) -> None:
        """Release the database (the pool only when it is this object's own)."""
        if self._owns_pool:
            self._pool.close()
