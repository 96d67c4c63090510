"""The outbox among replicas on PostgreSQL: redeliver against a concurrent prune, lanes nobody owns, `once` and the
fair share, fenced delivery."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from conftest import wait_for
from store_contract.support import apply, cp, success

from watcher.config.load import parse_config
from watcher.errors import StoreError
from watcher.store.postgres.store import PostgresStore


def _waiting_on_a_lock(url: str, pid: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "Lock"


@pytest.mark.parametrize("dead", [False, True])
def test_redeliver_locks_the_event_so_a_concurrent_prune_never_leaves_a_row_without_its_event(
    pg_url: str, dead: bool
) -> None:
    store = PostgresStore(pg_url, pool_min=1, pool_max=1)  # one connection: its backend pid is the redeliver's
    try:
        now = time.time()
        apply(store, success(cp(1)), now=now)
        event = apply(store, success(cp(1), cp(2)), now=now, route=lambda _e: ["hook"]).events[0]
        store.record_delivery("hook", [event.id], state="dead", now=now, error="x")
        with store.pool.connection() as conn:
            pid = conn.info.backend_pid
        done = threading.Event()
        failures: list[BaseException] = []

        def redeliver() -> None:
            try:
                if dead:
                    store.redeliver(now=now + 1, dead=True)
                else:
                    store.redeliver(now=now + 1, event_ids=[event.id], route=lambda _e: ["hook"])
            except StoreError as err:
                failures.append(err)
            finally:
                done.set()

        # what a prune batch does: the event locked (FOR UPDATE), then deleted with its finished rows
        with psycopg.connect(pg_url, autocommit=True) as prune, prune.transaction():
            prune.execute("SELECT 1 FROM events WHERE id = %s FOR UPDATE", (event.id,))
            worker = threading.Thread(target=redeliver)
            worker.start()
            wait_for(lambda: done.is_set() or _waiting_on_a_lock(pg_url, pid), what="redeliver ran or waits")
            prune.execute("DELETE FROM deliveries WHERE event_id = %s AND state != 'pending'", (event.id,))
            prune.execute("DELETE FROM events WHERE id = %s", (event.id,))
        worker.join(20)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            orphans = conn.execute(
                "SELECT count(*) FROM deliveries d WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = d.event_id)"
            ).fetchone()
        assert orphans == (0,)
        if not dead:  # the named event is gone by the time redeliver reads it
            assert failures and "no event with id" in str(failures[0])
    finally:
        store.close()


KEYS = [f"acme/bot/ft_{n}" for n in range(4)]


def replica_config(pg_url: str, *, keys: Sequence[str] = KEYS, **state: Any) -> Any:
    ids = [key.split("/")[2] for key in keys]
    data = {
        "hub": {"url": "http://127.0.0.1:9", "token": "t"},
        "state": {"url": pg_url, "lease_s": 15, **state},
        "fine_tunes": [{"namespace": "acme", "repo": "bot", "id": ft_id} for ft_id in ids],
        "notifiers": [{"name": "hook", "type": "log", "retry_schedule_s": [0, 0.2]}],
    }
    return parse_config(data, source="t.toml")


def test_once_claims_only_free_leases_and_never_counts_toward_the_fair_share(pg_url: str) -> None:
    from watcher.daemon.replicas.wiring import claim_for_once

    store = PostgresStore(pg_url)
    try:
        daemon = store.leases(replica="a", lease_s=15)
        assert len(daemon.claim(KEYS[:3]).acquired) == 3  # a lone daemon: its fair share is all of them
        claim = claim_for_once(store, replica_config(pg_url))
        assert claim is not None and claim.lanes() == [KEYS[3]]  # the free one only
        assert daemon.live() == 1  # `once` is not a replica among which leases are shared
        assert daemon.release_excess(KEYS) == []  # so the daemon gives nothing up while it runs
        assert daemon.claim(KEYS).share == 4
        claim.leave()
        assert daemon.live() == 1
    finally:
        store.close()
