"""Leases: which replica polls which fine-tune, with an epoch (fencing token) per fine-tune, on PostgreSQL.

Each replica heartbeats; a replica is live while its heartbeat is younger than the lease. A replica claims free or
expired leases up to its fair share (ceil(fine-tunes / live replicas)) with FOR UPDATE SKIP LOCKED, so replicas
never wait on each other; every claim raises the epoch, so a poll started under an older epoch can be fenced
(PostgresStore.apply_poll(..., fence=(replica, epoch))). All times are the database's (`now()`), never a host's.

Discovery sources are leased in the same table: a source's lease key is `source:<namespace>/<repo>` (one '/', where
a fine-tune's key "namespace/repo/id" has two, so the two never collide), shared out with a fair share of its own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from watcher.store.postgres.base import idle_limit, store_error
from watcher.store.replicas import (
    SOURCE_LEASE_PREFIX,
    Claim,
    Lease,
    Leases,
    is_source_lease,
    source_lease_key,
)

__all__ = [
    "RETENTION_LOCK",
    "SOURCE_LEASE_PREFIX",
    "AdvisoryGate",
    "Claim",
    "Lease",
    "Leases",
    "PostgresLeases",
    "fair_share",
    "is_source_lease",
    "source_lease_key",
]

T = TypeVar("T")
RETENTION_LOCK = 0x6F78_6E77_7265_7401  # pg advisory lock key: one replica prunes at a time
Conn = psycopg.Connection[Any]


def fair_share(fine_tunes: int, live: int) -> int:
    """ceil(fine-tunes / live replicas): the most leases one replica should hold."""
    return math.ceil(fine_tunes / max(live, 1))


_LEASE = "fine_tune_key, owner, epoch, extract(epoch FROM expires_at)::float8"


class PostgresLeases:
    """Leases and replica heartbeats in the PostgreSQL state database."""

    def __init__(self, pool: ConnectionPool, *, replica: str, lease_s: float, counted: bool = True) -> None:
        """`counted=False` (`once`): claim and release without a heartbeat, so this process is never a live
        replica: the daemons' fair share stays as it is and none of them releases leases because of it."""
        self._pool = pool
        self.replica = replica
        self.lease_s = lease_s
        self.counted = counted
        self._lock_timeout_ms = max(100, min(5000, int(lease_s * 250)))

    def _tx(self, fn: Callable[[Conn], T], *, what: str) -> T:
        try:
            with self._pool.connection() as conn, conn.transaction():
                # lease work never waits long on a row lock (a claim skips locked rows; a renewal or release waits
                # at most for a poll's commit): a stuck transaction elsewhere fails this call instead of freezing it;
                # and this process stalled inside one (SIGSTOP, a VM pause) must not keep its lease rows locked,
                # holding off their takeover, past the lease: the server then ends the transaction
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, true), "
                    "set_config('idle_in_transaction_session_timeout', %s, true)",
                    (f"{self._lock_timeout_ms}ms", idle_limit(self.lease_s)),
                )
                return fn(conn)
        except psycopg.Error as err:
            raise store_error(f"cannot {what}", err) from err

    def _heartbeat(self, conn: Conn) -> int:
        conn.execute(
            "INSERT INTO replicas (name, heartbeat_at, expires_at) "
            "VALUES (%s, now(), now() + make_interval(secs => %s)) "
            "ON CONFLICT (name) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at",
            (self.replica, self.lease_s),
        )
        return self._live(conn)

    @staticmethod
    def _live(conn: Conn) -> int:
        row = conn.execute("SELECT count(*) FROM replicas WHERE expires_at > now()").fetchone()
        return int(row[0]) if row else 0

    def heartbeat(self) -> int:
        """Mark this replica live; returns how many replicas are live."""
        return self._tx(self._heartbeat, what="record the replica heartbeat")

    def live(self) -> int:
        """How many replicas are live."""
        return self._tx(self._live, what="count live replicas")

    def claim(self, keys: Sequence[str], *, up_to: int | None = None) -> Claim:
        """Take free or expired leases among `keys`, up to the fair share (or `up_to` in all), never waiting:
        rows another replica is claiming or polling under a fence are skipped (FOR UPDATE SKIP LOCKED)."""
        wanted = sorted(set(keys))
        if wanted:
            # lease rows exist before anyone locks them; a statement of its own, outside the claim's transaction
            self._tx(
                lambda conn: conn.execute(
                    "INSERT INTO leases (fine_tune_key) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING", (wanted,)
                ),
                what="create leases",
            )

        def work(conn: Conn) -> Claim:
            live = self._heartbeat(conn) if self.counted else self._live(conn)
            share = fair_share(len(wanted), live) if up_to is None else up_to
            row = conn.execute(
                "SELECT count(*) FROM leases WHERE owner = %s AND fine_tune_key = ANY(%s) AND expires_at > now()",
                (self.replica, wanted),
            ).fetchone()
            owned = int(row[0]) if row else 0
            acquired: list[Lease] = []
            if share > owned:
                rows = conn.execute(
                    "WITH free AS (SELECT fine_tune_key, owner FROM leases WHERE fine_tune_key = ANY(%s) "
                    "AND (owner IS NULL OR expires_at <= now()) ORDER BY fine_tune_key LIMIT %s "
                    "FOR UPDATE SKIP LOCKED) "
                    "UPDATE leases l SET owner = %s, epoch = l.epoch + 1, acquired_at = now(), "
                    "expires_at = now() + make_interval(secs => %s) FROM free "
                    "WHERE l.fine_tune_key = free.fine_tune_key "
                    "RETURNING l.fine_tune_key, l.owner, l.epoch, extract(epoch FROM l.expires_at)::float8, free.owner",
                    (wanted, share - owned, self.replica, self.lease_s),
                ).fetchall()
                acquired = sorted((Lease(*row) for row in rows), key=lambda lease: lease.key)
            row = conn.execute("SELECT min(name) FROM replicas WHERE expires_at > now()").fetchone()
            return Claim(tuple(acquired), live, share, owned + len(acquired), row[0] if row else None)

        return self._tx(work, what="claim leases")

    def renew(self) -> list[Lease]:
        """Extend every lease this replica still holds (even one past its expiry that nobody took over: its epoch is
        unchanged, so nobody polled it meanwhile); returns them. A lease not returned was lost."""

        def work(conn: Conn) -> list[Lease]:
            if self.counted:
                self._heartbeat(conn)
            rows = conn.execute(
                f"UPDATE leases SET expires_at = now() + make_interval(secs => %s) WHERE owner = %s RETURNING {_LEASE}",
                (self.lease_s, self.replica),
            ).fetchall()
            return sorted((Lease(*row) for row in rows), key=lambda lease: lease.key)

        return self._tx(work, what="renew leases")

    def release(self, keys: Sequence[str]) -> list[str]:
        """Give up these leases (their epoch stays; the next claim raises it); returns the keys released."""
        if not keys:
            return []

        def work(conn: Conn) -> list[str]:
            rows = conn.execute(
                "UPDATE leases SET owner = NULL, expires_at = '-infinity' WHERE owner = %s AND fine_tune_key = ANY(%s) "
                "RETURNING fine_tune_key",
                (self.replica, list(keys)),
            ).fetchall()
            return sorted(row[0] for row in rows)

        return self._tx(work, what="release leases")

    def release_excess(self, keys: Sequence[str], *, sources: bool = False) -> list[str]:
        """Give up leases above the fair share of `keys` (the most recently acquired first) and every lease on a
        fine-tune not in `keys` (no longer in this replica's config); returns the keys released. With `sources`,
        the same among the sources' leases (each kind has its own fair share)."""
        wanted = set(keys)

        def pick(conn: Conn) -> list[str]:
            live = self._heartbeat(conn)
            rows = conn.execute(
                "SELECT fine_tune_key FROM leases WHERE owner = %s AND expires_at > now() "
                "ORDER BY acquired_at, fine_tune_key",
                (self.replica,),
            ).fetchall()
            mine = [row[0] for row in rows if is_source_lease(row[0]) == sources]
            kept = [key for key in mine if key in wanted]
            share = fair_share(len(wanted), live)
            return [key for key in mine if key not in wanted] + kept[share:]

        return self.release(self._tx(pick, what="release leases"))

    def owned(self) -> list[Lease]:
        """The unexpired leases this replica holds."""

        def read(conn: Conn) -> list[Lease]:
            rows = conn.execute(
                f"SELECT {_LEASE} FROM leases WHERE owner = %s AND expires_at > now() ORDER BY fine_tune_key",
                (self.replica,),
            ).fetchall()
            return [Lease(*row) for row in rows]

        return self._tx(read, what="read leases")

    def unowned(self, keys: Sequence[str] | None = None) -> int:
        """How many fine-tunes (of `keys`, else of every fine-tune's lease row) have no live owner; a key never
        claimed by anyone counts as unowned."""

        def read(conn: Conn) -> int:
            if keys is None:
                row = conn.execute(
                    "SELECT count(*) FROM leases WHERE (owner IS NULL OR expires_at <= now()) "
                    "AND NOT (fine_tune_key LIKE %s AND fine_tune_key NOT LIKE '%%/%%/%%')",
                    (SOURCE_LEASE_PREFIX + "%",),
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT count(*) FROM unnest(%s::text[]) AS k(key) WHERE NOT EXISTS (SELECT 1 FROM leases "
                    "WHERE fine_tune_key = k.key AND owner IS NOT NULL AND expires_at > now())",
                    (sorted(set(keys)),),
                ).fetchone()
            return int(row[0]) if row else 0

        return self._tx(read, what="count unowned fine-tunes")

    def leave(self) -> None:
        """Release every lease and stop counting as live (on shutdown)."""

        def work(conn: Conn) -> None:
            conn.execute("UPDATE leases SET owner = NULL, expires_at = '-infinity' WHERE owner = %s", (self.replica,))
            conn.execute("DELETE FROM replicas WHERE name = %s", (self.replica,))

        self._tx(work, what="release leases")


def _conforms(leases: PostgresLeases) -> Leases:
    """Checked by mypy: PostgresLeases implements the Leases protocol."""
    return leases


class AdvisoryGate:
    """A session advisory lock held on one pool connection: one replica at a time runs what it guards."""

    def __init__(self, pool: Any, key: int = RETENTION_LOCK) -> None:
        self._pool = pool
        self._key = key
        self._conn: Any = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another replica holds it."""
        try:
            conn = self._pool.getconn()
        except psycopg.Error as err:
            raise store_error("cannot take the retention lock", err) from err
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
        except psycopg.Error as err:
            self._pool.putconn(conn)
            raise store_error("cannot take the retention lock", err) from err
        if not (row and row[0]):
            self._pool.putconn(conn)
            return False
        self._conn = conn
        return True

    def release(self) -> None:
        """Give the lock back (a lost connection released it already)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        self._pool.putconn(conn)
