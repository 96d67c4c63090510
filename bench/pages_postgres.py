"""The status page benchmark's PostgreSQL side: the same database as bench/pages.py builds in SQLite, copied into a
throwaway cluster (watcher/testing/pgcluster.py), read through PostgresReports as a replica serves it.

Run as a part of bench/pages.py (`--stores sqlite,postgresql`, the default when PostgreSQL's server binaries are
installed).
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import orjson
import psycopg

from watcher.core.events import rfc3339
from watcher.core.models import FineTuneRef
from watcher.store.pages import SUMMARY_COLUMNS, backfill_summaries
from watcher.store.postgres.base import open_pool
from watcher.store.postgres.pages import PostgresReports
from watcher.store.postgres.schema import SEQ_SHIFT
from watcher.store.postgres.store import PostgresStore

TABLES = {
    "fine_tunes": "fine_tune_key, baselined, not_found, consecutive_failures, failing, best_loss, body_hash, "
    "last_poll_at, last_outcome, last_error, last_http_status, last_success_at, revision",
    "checkpoints": "fine_tune_key, step, fingerprint, data",
    "events": "seq, id, type, fine_tune_key, created_at, envelope",
    "deliveries": "event_seq, event_id, notifier, fine_tune_key, batch_id, state, attempts, next_attempt_at, queued_at",
    "run_summaries": SUMMARY_COLUMNS,
}
BOOLEANS = {"fine_tunes": (1, 2, 4)}  # INTEGER 0/1 in SQLite, BOOLEAN here


def copy_from_sqlite(sqlite_path: Path, url: str) -> float:
    """The SQLite database's rows in a new PostgreSQL database (schema by PostgresStore); seconds taken."""
    started = time.perf_counter()
    PostgresStore(url).close()
    source = sqlite3.connect(sqlite_path)
    with psycopg.connect(url, autocommit=True) as conn:
        for table, columns in TABLES.items():
            extra = ", xid" if table == "events" else ""
            flags = BOOLEANS.get(table, ())
            with conn.cursor().copy(f"COPY {table} ({columns}{extra}) FROM STDIN") as copy:
                for row in source.execute(f"SELECT {columns} FROM {table}"):
                    values = [bool(v) if i in flags else v for i, v in enumerate(row)]
                    if table == "events":
                        values.append(str(values[0] >> SEQ_SHIFT))  # as the store derives seq from the xid
                    copy.write_row(values)
        conn.execute("VACUUM ANALYZE")
    source.close()
    return time.perf_counter() - started


def reports_factory(url: str) -> PostgresReports:
    """The page's reads as a replica makes them (its own small pool here: the daemon shares the store's)."""
    return PostgresReports(open_pool(url, max_size=2), owns_pool=True)


def touch(url: str, refs: list[FineTuneRef], count: int) -> None:
    """A poll's commit for `count` fine-tunes: a new checkpoint and a revision bump."""
    with psycopg.connect(url) as conn:
        for ref in refs[:count]:
            (step,) = conn.execute("SELECT MAX(step) FROM checkpoints WHERE fine_tune_key = %s", (ref.key,)).fetchone()
            data = {"step": step + 100, "metrics": {"loss": 0.5}, "created_at": rfc3339(time.time())}
            conn.execute(
                "INSERT INTO checkpoints (fine_tune_key, step, fingerprint, data) VALUES (%s, %s, 'x', %s)",
                (ref.key, step + 100, orjson.dumps(data).decode()),
            )
            conn.execute("UPDATE fine_tunes SET revision = revision + 1 WHERE fine_tune_key = %s", (ref.key,))
        # and their summaries, as the store writes them in the same commit
        backfill_summaries(
            conn,
            mark="%s",
            fields=PostgresReports.checkpoint_fields,
            source=PostgresReports.checkpoint_from,
            keys=[ref.key for ref in refs[:count]],
        )


def server_cpu_s(postmaster: int | None) -> float:
    """CPU seconds (user + system) used so far by the cluster's processes: the postmaster and its children (the
    benchmark's throwaway cluster serves nothing else)."""
    if postmaster is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        pid, ppid = int(entry.name), int(fields[1])
        if pid == postmaster or ppid == postmaster:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total
