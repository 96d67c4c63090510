"""The status page on replicas: two real `oxen-watcher run` processes sharing a throwaway PostgreSQL cluster each
serve every fine-tune's state from the shared database, also the ones the other replica polls."""

from __future__ import annotations

import re

import httpx
import psycopg
from conftest import wait_for
from test_replicas import KEYS, Replica, _add_round, _config, _seed, _split

from watcher.testing.receiver import Receiver
from watcher.web.charts import fmt


def _owners(pg_url: str) -> dict[str, str]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return dict(conn.execute("SELECT fine_tune_key, owner FROM leases WHERE owner IS NOT NULL").fetchall())


def _losses(replica: Replica, key: str) -> list[float]:
    response = httpx.get(f"http://127.0.0.1:{replica.port}/api/v1/fine-tunes/{key}/checkpoints", timeout=10)
    assert response.status_code == 200, response.text
    return [checkpoint["metrics"]["loss"] for checkpoint in response.json()["checkpoints"]]


def test_every_replica_serves_every_fine_tune_from_the_shared_database(hub, tmp_path, daemons, pg_url):
    _seed(hub)
    with Receiver() as receiver:
        a = Replica(daemons(_config(hub, tmp_path, pg_url, "a", receiver)))
        b = Replica(daemons(_config(hub, tmp_path, pg_url, "b", receiver)))
        wait_for(lambda: _split(a, b), timeout=30, what="5 fine-tunes each")
        wait_for(lambda: a.ready() and b.ready(), what="both ready (each polled what it owns)")
        _add_round(hub, 2)
        _add_round(hub, 4)
        wanted = [1.0, 0.5, 0.25]
        for key in KEYS:
            wait_for(lambda key=key: _losses(a, key) == wanted, timeout=30, what=f"{key}'s checkpoints committed")
        owners = _owners(pg_url)
        assert sorted(owners) == KEYS and sorted(set(owners.values())) == ["a", "b"]
        for replica, name in ((a, "a"), (b, "b")):
            base = f"http://127.0.0.1:{replica.port}"
            overview = httpx.get(f"{base}/", timeout=10)
            assert overview.status_code == 200
            assert sorted(re.findall(r'data-key="([^"]+)"', overview.text)) == KEYS  # owned or not
            api = httpx.get(f"{base}/api/v1/fine-tunes", timeout=10).json()
            assert api["total"] == 10 and {entry["latest_step"] for entry in api["fine_tunes"]} == {4}
            assert {entry["last_outcome"] for entry in api["fine_tunes"]} == {"ok"}
            by_key = {"/".join(e["fine_tune"][k] for k in ("namespace", "repo", "id")): e for e in api["fine_tunes"]}
            assert {key: entry["replica"] for key, entry in by_key.items()} == owners  # who polls what
            other = next(key for key, owner in owners.items() if owner != name)
            assert _losses(replica, other) == wanted
            run = httpx.get(f"{base}/fine-tunes/{other}", timeout=10)
            assert run.status_code == 200
            assert f'<title id="loss-chart-title">loss, best {fmt(0.25)} at step 4</title>' in run.text
            assert f'<dd id="replica">replica {owners[other]}</dd>' in run.text
            events = httpx.get(f"{base}/events", timeout=10).text
            for body in (overview.text, run.text, events):
                assert pg_url not in body and "postgresql://" not in body
        for replica in (a, b):
            assert replica.daemon.terminate() == 0
