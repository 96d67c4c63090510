"""What the PostgreSQL store's parts share: the pool, transactions, and errors wrapped without any DSN part."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from watcher.errors import LeaseLost, StoreError
from watcher.store.rows import event_from_row

T = TypeVar("T")
Conn = psycopg.Connection[Any]
# the server ends a session left idle inside a transaction this long (SET LOCAL: PgBouncer transaction mode keeps
# no session settings)
IDLE_LIMIT_SQL = "SELECT set_config('idle_in_transaction_session_timeout', %s, true)"


def idle_limit(seconds: float) -> str:
    """An idle_in_transaction_session_timeout value (whole milliseconds, at least one)."""
    return f"{max(1, round(seconds * 1000))}ms"


__all__ = ["RECONNECT_TIMEOUT_S", "PgBase", "event_from_row", "open_pool", "store_error"]


def store_error(what: str, err: BaseException) -> StoreError:
    """A StoreError for a psycopg error with a safe message: the server's primary message and SQLSTATE only.

    psycopg's own messages for connection failures can quote the host, port, user or database of the DSN, so they
    are never copied; the server's primary message names no part of the URL.
    """
    sqlstate = getattr(err, "sqlstate", None)
    if isinstance(err, psycopg.Error) and sqlstate and not sqlstate.startswith("08"):
        primary = err.diag.message_primary or type(err).__name__
        return StoreError(f"{what}: {primary} (SQLSTATE {sqlstate})")
    reason = f"the PostgreSQL database is unreachable or the connection was lost ({type(err).__name__})"
    return StoreError(f"{what}: {reason}")


RECONNECT_TIMEOUT_S = 30.0


def open_pool(url: str, *, min_size: int = 1, max_size: int = 4, timeout_s: float = 10.0) -> ConnectionPool:
    """A connection pool that works behind PgBouncer in transaction mode (no server-side prepared statements).

    Connections are autocommit: each unit of work opens its own transaction block. Each connection is checked
    when taken from the pool, so a database restart costs one failed check, not a failed poll.
    """
    pool: ConnectionPool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout_s,
        kwargs={"autocommit": True, "prepare_threshold": None},
        check=ConnectionPool.check_connection,
        # the pool's reconnect back-off doubles without bound until this many seconds, then starts again at 1 s
        # with the next request: 30 s keeps the gap between attempts under 16 s, so a replica is back within
        # seconds of the database, however long the outage was (the default 300 s allows gaps of minutes)
        reconnect_timeout=RECONNECT_TIMEOUT_S,
        open=False,
        name="oxen-watcher",
    )
    try:
        pool.open(wait=True, timeout=timeout_s)
    except psycopg.Error as err:
        pool.close()
        raise store_error("cannot open the PostgreSQL state database", err) from err
    return pool


class PgBase:
    """The pool and the two ways to use it: a transaction, or one read."""

    _pool: ConnectionPool
    _idle_limit_s: float | None = None  # see _tx

    def _tx(
        self, fn: Callable[[psycopg.Connection[Any]], T], *, what: str = "write the outbox", bounded: bool = True
    ) -> T:
        """Run `fn` in one transaction; `bounded=False` for work that takes no lease's row locks (reads, the
        start-up schema check): the idle limit must not end a long read of a large database."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                if bounded and self._idle_limit_s is not None:
                    # a process stalled inside a transaction (SIGSTOP, swapped out, a VM pause) holds the row and
                    # advisory locks of its fine-tunes, which keeps every other replica from taking them over for
                    # as long as it stalls: the server ends such a transaction once it has been idle this long
                    conn.execute(IDLE_LIMIT_SQL, (idle_limit(self._idle_limit_s),))
                return fn(conn)
        except psycopg.Error as err:
            raise store_error(f"cannot {what}", err) from err

    def _update_each(self, sql: str, rows: Sequence[Sequence[Any]], *, what: str) -> list[int]:
        """Run one statement per row in one transaction; each row's rowcount."""
        return self._tx(lambda conn: [conn.execute(sql, row).rowcount for row in rows], what=what)

    def _read(self, sql: str, args: Sequence[Any] = (), *, what: str = "read the outbox") -> list[tuple[Any, ...]]:
        try:
            with self._pool.connection() as conn:
                return conn.execute(sql, args).fetchall()
        except psycopg.Error as err:
            raise store_error(f"cannot {what}", err) from err

    def pool_stats(self) -> dict[str, int]:
        """The pool's size and waiting clients (psycopg_pool's counters), for metrics."""
        stats = self._pool.get_stats()
        return {"pool_size": stats.get("pool_size", 0), "requests_waiting": stats.get("requests_waiting", 0)}

    def close(self) -> None:
        """Release the database."""
        self._pool.close()


def check_fence(conn: Conn, key: str, fence: tuple[str, int], *, what: str) -> None:
    """Raise LeaseLost unless this replica still holds the lease of `key` at the fence's epoch (in the caller's
    transaction, so the commit and the check are one)."""
    # KEY SHARE holds off a takeover (a claim locks the row FOR UPDATE, SKIP LOCKED) until this commits,
    # yet lets the owner's renewals through
    row = conn.execute("SELECT owner, epoch FROM leases WHERE fine_tune_key = %s FOR KEY SHARE", (key,)).fetchone()
    if row is None or (row[0], row[1]) != fence:
        raise LeaseLost(f"lease of {key} lost: held by another replica or at another epoch; {what} not committed")
