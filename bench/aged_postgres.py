"""Aged database on PostgreSQL: does a year of history slow the PostgreSQL store down (bench/aged.py's calls)?

The same history as bench/aged.py (events and outbox rows of a year, bulk-loaded with COPY: the envelopes the real
code produced, not apply_poll) in a throwaway cluster, then the store's hot calls on it and on a fresh database in
the same cluster, median of interleaved rounds. The work of a call is mostly the server's, in other processes, so
the figure is CPU time of this process and of the cluster's processes together (from /proc: load elsewhere on the
machine does not count; the clock ticks in 10 ms, so each round makes 5 times the SQLite section's calls). Then
retention (30 days) runs on the aged database.

    .venv/bin/python bench/aged_postgres.py            # AGED_PG_SCALE=0.1: 300,000 events, 600,000 outbox rows
    AGED_PG_SCALE=1 .venv/bin/python bench/aged_postgres.py
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aged
from pages_postgres import server_cpu_s

from watcher.store.postgres.schema import SEQ_SHIFT
from watcher.store.postgres.store import PostgresStore
from watcher.testing.pgcluster import throwaway_cluster

DEFAULT_SCALE = 0.1  # a tenth of a year's 3 M events: the full load takes too long on a small machine


def fill(url: str, rows: Iterator[tuple[tuple[Any, ...], list[tuple[Any, ...]]]]) -> tuple[int, int]:
    """COPY history rows into a store's tables (the store creates the schema); returns the counts."""
    PostgresStore(url).close()
    events = deliveries = 0
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            cursor = conn.cursor()
            with cursor.copy(
                "COPY events (seq, xid, id, type, fine_tune_key, created_at, envelope) FROM STDIN"
            ) as copy_events:
                outbox: list[tuple[Any, ...]] = []
                for event, rows_ in rows:
                    seq, event_id, kind, key, created, envelope = event
                    # as the store derives seq from the writing transaction's id
                    copy_events.write_row((seq, str(seq >> SEQ_SHIFT), event_id, kind, key, created, envelope))
                    events += 1
                    outbox += rows_
            with cursor.copy(
                "COPY deliveries (event_seq, event_id, notifier, fine_tune_key, batch_id, state, attempts, "
                "next_attempt_at, queued_at, last_error, last_status, delivered_at) FROM STDIN"
            ) as copy_deliveries:
                for row in outbox:
                    copy_deliveries.write_row(row)
                    deliveries += 1
        conn.execute("VACUUM ANALYZE")
    return events, deliveries


def run(scale: float | None = None) -> dict[str, Any]:
    """The aged-database section on PostgreSQL; returns its figures."""
    scale = float(os.environ.get("AGED_PG_SCALE", DEFAULT_SCALE)) if scale is None else scale
    events = max(1000, int(aged.YEAR_EVENTS * scale))
    print(
        f"== Aged database on PostgreSQL: {events:,} events, {2 * events:,} outbox rows over a year "
        f"(AGED_PG_SCALE={scale}; CPU per call, client and server) =="
    )
    with throwaway_cluster() as cluster:
        aged_url, fresh_url = cluster.create_database("aged"), cluster.create_database("fresh")
        started = time.monotonic()
        counts = fill(aged_url, aged.history_rows(events=events, now=time.time()))
        with psycopg.connect(aged_url) as conn:
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        size = row[0] if row else 0
        print(
            f"built in {time.monotonic() - started:.0f} s: {counts[0]:,} events, {counts[1]:,} outbox rows, "
            f"{size / 2**20:,.0f} MiB"
        )
        for url in (aged_url, fresh_url):  # autovacuum's CPU, in the cluster's processes, would land on a random call
            PostgresStore(url).close()
            with psycopg.connect(url, autocommit=True) as conn:
                # what autovacuum has done to a year-old database: statistics and the visibility map (without it an
                # index-only scan fetches every heap row it returns); then it is switched off for the measurement
                conn.execute("VACUUM (ANALYZE) events, deliveries, checkpoints, fine_tunes")
                for table in ("events", "deliveries", "checkpoints", "fine_tunes"):
                    conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
        now = time.time()
        fresh = aged.Rig(PostgresStore(fresh_url), now=now)
        old = aged.Rig(PostgresStore(aged_url), now=now)
        postmaster = cluster.postmaster_pid()

        def clock() -> float:
            return time.process_time() + server_cpu_s(postmaster)

        results = aged.measure(fresh, old, clock=clock, more=5)
        figures: dict[str, Any] = {"events": counts[0], "deliveries": counts[1], "aged_bytes": size, "calls": {}}
        worst = 0.0
        for name, (on_fresh, on_aged) in results.items():
            ratio = on_aged / on_fresh if on_fresh else float("inf")
            worst = max(worst, ratio)
            figures["calls"][name] = {"fresh_s": on_fresh, "aged_s": on_aged, "ratio": ratio}
            print(f"{name:<44} fresh {on_fresh * 1e3:8.3f} ms  aged {on_aged * 1e3:8.3f} ms  = {ratio:4.2f}x")
        print(f"worst ratio {worst:.2f}x (goal <= 1.2x): {'met' if worst <= 1.2 else 'NOT met'}")
        rare = aged.cpu(lambda: old.store.recent_events(limit=50, type_glob="fine_tune.*"), 100, clock)
        print(f"aged only: recent_events(50, type_glob='fine_tune.*') (2 % of the events) {rare * 1e3:.3f} ms")
        fresh.store.close()
        started_prune = time.monotonic()
        report = old.store.prune(now=old.now, retain_s=aged.RETAIN_DAYS * aged.DAY)
        prune_s = time.monotonic() - started_prune
        old.store.close()
        print(
            f"prune ({aged.RETAIN_DAYS} days): {report.events:,} events and {report.deliveries:,} outbox rows removed "
            f"in {prune_s:.0f} s"
        )
        figures.update(
            {
                "rare_type_s": rare,
                "prune": {"events": report.events, "deliveries": report.deliveries, "seconds": prune_s},
                "worst_ratio": worst,
                "scale": scale,
            }
        )
        return figures


if __name__ == "__main__":
    run()
