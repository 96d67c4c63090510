"""The SQLite schema: versioned migrations, applied in order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from watcher.store.pages import backfill_summaries


def _backfill_summaries(db: Any) -> None:
    from watcher.store.sqlite.pages import SqliteReports

    backfill_summaries(db, mark="?", fields=SqliteReports.checkpoint_fields, source=SqliteReports.checkpoint_from)


# Each entry upgrades the schema by one version; never edit a released one, append a new one. A step is a
# statement, or a function of the connection (a backfill that needs Python).
MIGRATIONS: tuple[tuple[str | Callable[[Any], None], ...], ...] = (
    (
        """CREATE TABLE fine_tunes (
            fine_tune_key TEXT PRIMARY KEY,
            baselined INTEGER NOT NULL DEFAULT 0,
            not_found INTEGER NOT NULL DEFAULT 0,
            consecutive_failures INTEGER NOT NULL DEFAULT 0,
            failing INTEGER NOT NULL DEFAULT 0,
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
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            fine_tune_key TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            envelope TEXT NOT NULL
        )""",
        "CREATE INDEX events_fine_tune ON events (fine_tune_key, seq)",
    ),
    (
        # The outbox: one row per (event, notifier) whose filters match, created with the event.
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
    ),
    (
        # A large history stays cheap: retention finds old events by time, `events --type` reads one type's
        # rows newest first, and the outbox queries read pending (or dead) rows only: partial indexes hold
        # nothing of the delivered rows, which are almost all of them.
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
        # Lifecycle (issue 9): each fine-tune's last Hub status and stall clock, and each [[discover]] source's
        # baseline and every id it ever listed (never removed: a fine-tune missing from a list is not gone).
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
        # Per-fine-tune summaries for the status page (issue 15), written with the checkpoints (store/pages.py);
        # filled from the checkpoints already stored
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
