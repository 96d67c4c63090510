"""The PostgreSQL schema: versioned migrations, applied in order under an advisory lock (replicas may start at once).

Differences from SQLite: events carry the id of the transaction that wrote them (`xid`, an xid8) and their `seq`
is derived from it, so a reader can stop below the oldest transaction still in progress and never skip an event
committed out of order; leases and replica heartbeats share the fine-tunes out among replicas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from watcher.store.pages import backfill_summaries

# the key of the advisory lock held while migrating (any constant; "oxenwtch" in ASCII)
MIGRATION_LOCK = 0x6F78656E77746368


def _backfill_summaries(conn: Any) -> None:
    from watcher.store.postgres.pages import PostgresReports

    backfill_summaries(
        conn, mark="%s", fields=PostgresReports.checkpoint_fields, source=PostgresReports.checkpoint_from
    )


# Each entry upgrades the schema by one version; never edit a released one, append a new one. A step is a
# statement, or a function of the connection (a backfill that needs Python).
MIGRATIONS: tuple[tuple[str | Callable[[Any], None], ...], ...] = (
    (
        """CREATE TABLE fine_tunes (
            fine_tune_key TEXT PRIMARY KEY,
            baselined BOOLEAN NOT NULL DEFAULT false,
            not_found BOOLEAN NOT NULL DEFAULT false,
            consecutive_failures INTEGER NOT NULL DEFAULT 0,
            failing BOOLEAN NOT NULL DEFAULT false,
            best_loss DOUBLE PRECISION,
            body_hash TEXT,
            not_before DOUBLE PRECISION,
            last_poll_at DOUBLE PRECISION,
            last_outcome TEXT,
            last_error TEXT,
            last_http_status INTEGER,
            last_success_at DOUBLE PRECISION,
            revision BIGINT NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE checkpoints (
            fine_tune_key TEXT NOT NULL,
            step BIGINT NOT NULL,
            fingerprint TEXT NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (fine_tune_key, step)
        )""",
        # seq = (xid << 20) + position in the transaction: ordered like the writing transactions' ids
        """CREATE TABLE events (
            seq BIGINT PRIMARY KEY,
            xid XID8 NOT NULL,
            id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            fine_tune_key TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            envelope TEXT NOT NULL
        )""",
        "CREATE INDEX events_fine_tune ON events (fine_tune_key, seq)",
        """CREATE TABLE deliveries (
            event_seq BIGINT NOT NULL,
            event_id TEXT NOT NULL,
            notifier TEXT NOT NULL,
            fine_tune_key TEXT NOT NULL,
            batch_id TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at DOUBLE PRECISION,
            queued_at DOUBLE PRECISION NOT NULL,
            last_error TEXT,
            last_status INTEGER,
            delivered_at DOUBLE PRECISION,
            PRIMARY KEY (event_id, notifier)
        )""",
        "CREATE INDEX deliveries_lane ON deliveries (notifier, state, fine_tune_key, event_seq)",
        # one row per live (or recently live) replica: its heartbeat
        """CREATE TABLE replicas (
            name TEXT PRIMARY KEY,
            heartbeat_at TIMESTAMPTZ NOT NULL,
            expires_at TIMESTAMPTZ NOT NULL
        )""",
        # one row per fine-tune ever claimed: owner (NULL when free), epoch (the fencing token), expiry
        """CREATE TABLE leases (
            fine_tune_key TEXT PRIMARY KEY,
            owner TEXT,
            epoch BIGINT NOT NULL DEFAULT 0,
            expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
            acquired_at TIMESTAMPTZ
        )""",
        "CREATE INDEX leases_owner ON leases (owner)",
    ),
    (
        # lifecycle (issue 9): per fine-tune status and stall clock, per discovery source its baseline and ids
        """CREATE TABLE lifecycle (
            fine_tune_key TEXT PRIMARY KEY,
            source TEXT,
            name TEXT,
            status TEXT,
            error TEXT,
            started_at TEXT,
            finished_at TEXT,
            first_seen_at DOUBLE PRECISION,
            newest_step BIGINT,
            newest_seen_at DOUBLE PRECISION,
            stalled INTEGER NOT NULL DEFAULT 0,
            status_at DOUBLE PRECISION,
            announce_checkpoints INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE sources (
            name TEXT PRIMARY KEY,
            baselined INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE source_ids (
            source TEXT NOT NULL,
            fine_tune_id TEXT NOT NULL,
            PRIMARY KEY (source, fine_tune_id)
        )""",
    ),
    (
        # replicas (issue 10): what each source watches now, as its reader last committed it (a JSON list of
        # [namespace, repo, id, name]), so the replicas that do not read the source claim its fine-tunes too
        "ALTER TABLE sources ADD COLUMN watching TEXT",
    ),
    (
        # replicas (issue 15): the statuses the source's last read listed, with its time (JSON: read_at and
        # fine_tunes), so the owners of those fine-tunes that do not read the source take them as status reads
        "ALTER TABLE sources ADD COLUMN listed TEXT",
    ),
    (
        # SQLite's retention indexes (its third migration), which PostgreSQL never got: retention finds old events
        # by time, `events --type` and `/events?type=` read one type's rows newest first, and the outbox queries
        # read pending (or dead) rows only: partial indexes hold nothing of the delivered rows, which are almost
        # all of them. tests/store_contract/test_schema_parity.py holds the two schemas' indexes together.
        "CREATE INDEX events_created ON events (created_at)",
        "CREATE INDEX events_type ON events (type, seq)",
        "CREATE INDEX deliveries_pending_lane ON deliveries (notifier, fine_tune_key, event_seq) "
        "WHERE state = 'pending'",
        # state is a column too (always 'pending') so the statistics and next_due_at read this index alone
        "CREATE INDEX deliveries_pending_due ON deliveries (notifier, next_attempt_at, queued_at, state) "
        "WHERE state = 'pending'",
        "CREATE INDEX deliveries_dead ON deliveries (queued_at) WHERE state = 'dead'",
        "DROP INDEX deliveries_lane",
    ),
    (
        # Per-fine-tune summaries for the status page (issue 15), written with the checkpoints (store/pages.py);
        # filled from the checkpoints already stored. The replicas' role needs SELECT, INSERT, UPDATE on it.
        """CREATE TABLE run_summaries (
            fine_tune_key TEXT PRIMARY KEY,
            checkpoints INTEGER NOT NULL,
            latest_step BIGINT,
            latest_loss DOUBLE PRECISION,
            latest_created_at TEXT,
            latest_deployment TEXT,
            best_loss DOUBLE PRECISION,
            best_step BIGINT,
            spark TEXT NOT NULL
        )""",
        _backfill_summaries,
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# events per transaction fit in the low bits of seq
SEQ_SHIFT = 20
