"""The replicas' role of README.md ("Running several replicas") holds only the documented GRANTs, and that is
enough: the leases and the retention gate work as it (the store contract runs as it too, in
tests/store_contract/), while creating or dropping anything is refused."""

from __future__ import annotations

import psycopg
import pytest
from pg_roles import least_privilege_database

from watcher.store.postgres.leases import AdvisoryGate, PostgresLeases
from watcher.store.postgres.store import PostgresStore

KEYS = ["acme/bot/ft_a", "acme/bot/ft_b", "acme/bot/ft_c"]


def test_the_replicas_role_runs_the_leases_and_the_retention_gate(pg_cluster):
    with least_privilege_database(pg_cluster) as (_, replica_url):
        store = PostgresStore(replica_url)
        try:
            one = PostgresLeases(store.pool, replica="host-a-1", lease_s=30)
            two = PostgresLeases(store.pool, replica="host-b-1", lease_s=30)
            assert one.heartbeat() == 1
            assert [lease.key for lease in one.claim(KEYS).acquired] == KEYS
            assert two.heartbeat() == 2
            assert one.release_excess(KEYS) == ["acme/bot/ft_c"]  # above the fair share of two replicas
            assert [lease.key for lease in two.claim(KEYS).acquired] == ["acme/bot/ft_c"]
            assert [lease.key for lease in one.renew()] == KEYS[:2]
            assert one.unowned(KEYS) == 0 and one.live() == 2
            assert one.release(["acme/bot/ft_a"]) == ["acme/bot/ft_a"]
            one.leave()
            assert [lease.key for lease in two.owned()] == ["acme/bot/ft_c"]
            assert two.unowned(KEYS) == 2

            gate, other = AdvisoryGate(store.pool), AdvisoryGate(store.pool)
            assert gate.acquire()
            assert not other.acquire()  # one replica prunes at a time
            gate.release()
            assert other.acquire()
            other.release()
        finally:
            store.close()


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE extra (x int)",
        "DROP TABLE events",
        "ALTER TABLE events ADD COLUMN x int",
        "TRUNCATE deliveries",
        "DELETE FROM leases",
        "DELETE FROM fine_tunes",
        "UPDATE schema_version SET version = 0",
    ],
)
def test_the_replicas_role_can_do_nothing_else(pg_cluster, statement):
    with least_privilege_database(pg_cluster) as (_, replica_url), psycopg.connect(replica_url) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)  # type: ignore[arg-type]
