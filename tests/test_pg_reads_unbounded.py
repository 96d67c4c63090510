"""Reads not under a lease are not bounded by the lease: a replica with a short lease (the server ends a
transaction idle for `lease_s`) still reads a large database at start-up, however long parsing its rows takes."""

from __future__ import annotations

import time

from store_contract.support import REF, apply, cp, success

from watcher.core.models import FineTuneRef
from watcher.store.postgres.store import PostgresStore

FINE_TUNES = [FineTuneRef(REF.namespace, REF.repo, f"ft_{n}", f"ft_{n}") for n in range(20)]
STEPS = 150


def test_start_up_reads_of_a_large_database_outlast_a_short_idle_limit(pg_url: str) -> None:
    writer = PostgresStore(pg_url)
    now = time.time()
    try:
        for ref in FINE_TUNES:  # 3,000 checkpoints: decoding them takes far longer than the limit below
            apply(writer, success(*(cp(step) for step in range(1, STEPS + 1))), ref=ref, now=now)
    finally:
        writer.close()
    # 2 ms: every start-up read spends longer than that in this process between its statements and its commit
    store = PostgresStore(pg_url, idle_limit_s=0.002)
    try:
        statuses = store.statuses([ref.key for ref in FINE_TUNES])
        assert [status.checkpoints for status in statuses] == [STEPS] * len(FINE_TUNES)
        assert len(store.load_state(FINE_TUNES[0].key).checkpoints) == STEPS
    finally:
        store.close()
    reader = PostgresStore(pg_url, readonly=True, idle_limit_s=0.002)  # `status`, `events` on a replicas' database
    try:
        assert len(reader.statuses()) == len(FINE_TUNES)
    finally:
        reader.close()
