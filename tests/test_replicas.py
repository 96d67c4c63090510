"""Replicas end to end: real `oxen-watcher run` processes sharing a throwaway PostgreSQL cluster and the simulated
Hub; ownership, takeover after kill -9, fencing of a paused replica, and a database outage."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
from conftest import Daemon, base_config, cli, wait_for, write_config
from reliability._replicas import owners
from test_operations import listen_port, scrape, value

from watcher.testing.receiver import Receiver
from watcher.testing.simhub import Fault

LEASE_S = 3.0
RENEW_S = 1.0
FINE_TUNES = [{"namespace": "acme", "repo": "bot", "id": f"ft_{n}"} for n in range(10)]
KEYS = [f"acme/bot/ft_{n}" for n in range(10)]


def _config(hub: Any, tmp_path: Path, pg_url: str, name: str, receiver: Receiver) -> Path:
    data = base_config(
        hub,
        tmp_path,
        fine_tunes=FINE_TUNES,
        watch={"interval_s": 0.5, "jitter_s": 0, "baseline": True},
        notifiers=[{"name": "ci", "type": "webhook", "url": receiver.url, "timeout_s": 5}],
    )
    data["state"] = {"url": pg_url, "lease_s": LEASE_S, "renew_s": RENEW_S, "replica": name}
    return write_config(tmp_path / f"{name}.toml", data)


class Replica:
    """One replica process and its metrics endpoint."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.port = listen_port(daemon)

    def metric(self, name: str, **labels: str) -> float:
        found = value(scrape(self.port), name, **labels)
        return -1.0 if found is None else found

    def owned(self) -> int:
        try:
            return int(self.metric("oxen_watcher_leases_owned"))
        except httpx.HTTPError:
            return -1

    def ready(self) -> bool:
        return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5).status_code == 200


def _start(daemons: Any, config: Path) -> Replica:
    return Replica(daemons(config))


def _events(config: Path) -> list[dict[str, Any]]:
    result = cli("events", "-c", str(config), "--json", "--limit", "100000")
    assert result.returncode == 0, result.stderr
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def _announced(config: Path) -> Counter[tuple[str, str, int]]:
    """(type, fine-tune key, step) of every committed checkpoint event, counted."""
    found: Counter[tuple[str, str, int]] = Counter()
    for event in _events(config):
        ft = event["data"]["fine_tune"]
        key = f"{ft['namespace']}/{ft['repo']}/{ft['id']}"
        found[(event["type"], key, event["data"]["checkpoint"]["step"])] += 1
    return found


def _seed(hub: Any) -> None:
    for key, ft in zip(KEYS, FINE_TUNES, strict=True):
        hub.add_fine_tune(ft["namespace"], ft["repo"], ft["id"])
        hub.add_checkpoint(key, 1, loss=1.0)


def _add_round(hub: Any, step: int) -> set[tuple[str, str, int]]:
    for key in KEYS:
        hub.add_checkpoint(key, step, loss=1.0 / step)
    return {("checkpoint.created", key, step) for key in KEYS}


def _split(a: Replica, b: Replica) -> bool:
    return a.owned() == 5 and b.owned() == 5


def _two_split(hub: Any, tmp_path: Path, daemons: Any, pg_url: str, receiver: Receiver) -> tuple[Replica, Replica]:
    """Replicas a and b on one database, once they hold 5 of the 10 seeded fine-tunes each."""
    a = _start(daemons, _config(hub, tmp_path, pg_url, "a", receiver))
    b = _start(daemons, _config(hub, tmp_path, pg_url, "b", receiver))
    wait_for(lambda: _split(a, b), timeout=30, what="5 fine-tunes each")
    return a, b


def _exactly_once(config: Path, receiver: Receiver, wanted: set[tuple[str, str, int]]) -> None:
    wait_for(lambda: set(_announced(config)) >= wanted, timeout=60, what="every change announced")
    announced = _announced(config)
    assert set(announced) == wanted, set(announced) ^ wanted
    assert all(count == 1 for count in announced.values()), announced.most_common(3)
    ids = {event["id"] for event in _events(config)}
    wait_for(lambda: {r.webhook_id for r in receiver.deliveries()} >= ids, timeout=60, what="every event delivered")


def test_two_replicas_split_ten_fine_tunes_and_announce_each_change_once(hub, tmp_path, daemons, pg_url):
    _seed(hub)
    with Receiver() as receiver:
        a, b = _two_split(hub, tmp_path, daemons, pg_url, receiver)
        assert a.metric("oxen_watcher_replicas_live") == 2
        wait_for(lambda: a.metric("oxen_watcher_fine_tunes_unowned") == 0, what="no fine-tune unowned")
        wait_for(lambda: a.ready() and b.ready(), what="both ready (each polled what it owns)")
        assert a.metric("oxen_watcher_db_pool_size") >= 1 and a.metric("oxen_watcher_db_pool_waiting") == 0
        # per-fine-tune series only on the owner: 5 fine-tunes x 4 outcomes each
        text = scrape(a.port)
        assert sum(1 for line in text.splitlines() if line.startswith("oxen_watcher_polls_total{")) == 20
        wanted: set[tuple[str, str, int]] = set()
        for step in (2, 3, 4):  # one round of changes after another, each seen before the next
            wanted |= _add_round(hub, step)
            wait_for(lambda: set(_announced(a.daemon.config)) >= wanted, timeout=30, what=f"step {step}")
        _exactly_once(a.daemon.config, receiver, wanted)
        assert [owner for _, owner in _lease_rows(pg_url)].count("a") == 5
        assert a.daemon.terminate() == 0
        # a clean exit releases at once: none of its leases is left in its name once it has ended (left to expire,
        # they would stay a's for a whole lease), read from the database, which a loaded machine cannot hurry
        assert [key for key, owner in _lease_rows(pg_url) if owner == "a"] == []
        wait_for(lambda: b.owned() == 10, timeout=LEASE_S + RENEW_S + 10, what="takeover after a clean exit")
        # the new owner exports the per-fine-tune series of all ten now
        wait_for(lambda: scrape(b.port).count("oxen_watcher_polls_total{") == 40, what="b's series for every fine-tune")
        assert any(e.get("event") == "replica.left" for e in a.daemon.logs())
        assert b.metric("oxen_watcher_lease_changes_total", change="fenced") == 0
        assert b.daemon.terminate() == 0


def test_kill_9_of_one_replica_hands_its_fine_tunes_over_within_the_lease(hub, tmp_path, daemons, pg_url):
    _seed(hub)
    with Receiver() as receiver:
        a, b = _two_split(hub, tmp_path, daemons, pg_url, receiver)
        wanted = _add_round(hub, 2)
        a.daemon.kill9()
        killed_at = time.monotonic()
        wait_for(lambda: b.owned() == 10, timeout=LEASE_S + RENEW_S + 2, what="takeover after kill -9")
        took = time.monotonic() - killed_at
        assert took <= LEASE_S + RENEW_S + 2
        assert b.metric("oxen_watcher_lease_changes_total", change="acquired") >= 10
        wanted |= _add_round(hub, 3)
        _exactly_once(b.daemon.config, receiver, wanted)
        assert b.daemon.terminate() == 0


def test_a_replica_paused_past_its_lease_is_fenced_and_commits_nothing_stale(hub, tmp_path, daemons, pg_url):
    _seed(hub)
    with Receiver() as receiver:
        a, b = _two_split(hub, tmp_path, daemons, pg_url, receiver)
        wanted = _add_round(hub, 2)
        wait_for(lambda: set(_announced(a.daemon.config)) >= wanted, timeout=30, what="step 2 announced")
        assert a.daemon.proc is not None
        # stopped while one of its polls waits for the Hub: on resuming, that poll's commit (under the lease it
        # no longer holds) is fenced whatever else the resumed replica does first
        held = wait_for(lambda: sorted(k for k, owner in (owners(pg_url) or {}).items() if owner == "a"), what="a's")
        before = len(hub.requests(held[0]))
        hub.inject(held[0], Fault(status=404, delay_s=2 * LEASE_S, endpoint="checkpoints"))
        wait_for(
            lambda: any(record.status == 404 for record in hub.requests(held[0])[before:]),
            interval=0.02,
            what="a's poll in flight",
        )
        os.kill(a.daemon.proc.pid, signal.SIGSTOP)
        paused_until = time.monotonic() + 2 * LEASE_S
        try:
            wait_for(lambda: b.owned() == 10, timeout=LEASE_S + RENEW_S + 2, what="takeover from the paused one")
            # the new owner moves the state on while the paused one still holds the old view
            for key in KEYS:
                hub.remove_checkpoint(key, 1)
            wanted |= {("checkpoint.removed", key, 1) for key in KEYS}
            wanted |= _add_round(hub, 3)
            wait_for(lambda: set(_announced(b.daemon.config)) >= wanted, timeout=30, what="changes seen by b")
            # the scenario: paused for (at least) twice the lease
            wait_for(lambda: time.monotonic() >= paused_until, timeout=3 * LEASE_S, what="twice the lease")
        finally:
            os.kill(a.daemon.proc.pid, signal.SIGCONT)
        wait_for(lambda: a.metric("oxen_watcher_lease_changes_total", change="fenced") > 0, what="a fenced commit")
        wait_for(lambda: _split(a, b), timeout=30, what="shared out again")
        wanted |= _add_round(hub, 4)
        # nothing stale: no second `created` of step 1 after its `removed`, every change exactly once
        _exactly_once(b.daemon.config, receiver, wanted)
        assert a.daemon.terminate() == 0
        assert b.daemon.terminate() == 0


def test_a_database_outage_is_survived_and_nothing_is_lost(hub, tmp_path, daemons, pg_url, pg_cluster):
    _seed(hub)
    with Receiver() as receiver:
        a, b = _two_split(hub, tmp_path, daemons, pg_url, receiver)
        wanted = _add_round(hub, 2)
        pg_cluster.stop()
        try:
            wanted |= _add_round(hub, 3)
            for replica in (a, b):
                wait_for(
                    lambda r=replica: any(e.get("event") == "replica.stopped" for e in r.daemon.logs()),
                    timeout=LEASE_S + 15,
                    what="renewals failing past the lease",
                )
            health = httpx.get(f"http://127.0.0.1:{a.port}/healthz", timeout=5)
            assert health.status_code == 503 and "lease renewals failing" in health.text
        finally:
            pg_cluster.start()
        wanted |= _add_round(hub, 4)
        wait_for(lambda: a.owned() + b.owned() == 10, timeout=30, what="leases back")
        _exactly_once(a.daemon.config, receiver, wanted)
        assert httpx.get(f"http://127.0.0.1:{a.port}/healthz", timeout=5).status_code == 200
        for replica in (a, b):
            assert replica.daemon.proc is not None and replica.daemon.proc.poll() is None
            assert replica.daemon.terminate() == 0


def _lease_rows(pg_url: str) -> list[tuple[str, str | None]]:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        return [(key, owner) for key, owner in conn.execute("SELECT fine_tune_key, owner FROM leases ORDER BY 1")]


def test_once_claims_only_free_leases_and_releases_them_on_exit(hub, tmp_path, daemons, pg_url):
    _seed(hub)
    with Receiver() as receiver:
        config = _config(hub, tmp_path, pg_url, "a", receiver)
        first = cli("once", "-c", str(config))
        assert first.returncode == 0, first.stderr
        assert sorted(line.split("\t")[0] for line in first.stdout.splitlines() if "\tok\t" in line) == KEYS
        assert [owner for _, owner in _lease_rows(pg_url)] == [None] * 10  # released on exit
        a = _start(daemons, config)
        wait_for(lambda: a.owned() == 10, timeout=30, what="the daemon owns everything")
        wanted = _add_round(hub, 2)
        beside = cli("once", "-c", str(config))
        assert beside.returncode == 0, beside.stderr
        assert beside.stdout.count("owned by a running replica") == 10  # nothing polled twice
        _exactly_once(config, receiver, wanted)
        assert pg_url not in first.stdout + first.stderr + beside.stdout + beside.stderr
        assert a.daemon.terminate() == 0


def test_status_events_and_prune_work_against_the_shared_database(hub, tmp_path, daemons, pg_url):
    _seed(hub)
    with Receiver() as receiver:
        config = _config(hub, tmp_path, pg_url, "a", receiver)
        assert cli("once", "-c", str(config)).returncode == 0
        status = cli("status", "-c", str(config), "--json")
        assert status.returncode == 0, status.stderr
        assert len(status.stdout.splitlines()) == 10
        pruned = cli("prune", "-c", str(config), "--dry-run")
        assert pruned.returncode == 0 and "would remove 0 events" in pruned.stdout, pruned.stderr
        assert cli("redeliver", "-c", str(config), "--dead").returncode == 0
        bad = write_config(tmp_path / "bad.toml", {**_toml_of(config), "state": {"url": "mysql://u:hunter22@h/db"}})
        for command in ("run", "once", "status", "events", "prune", "check-config"):
            result = cli(command, "-c", str(bad))
            assert result.returncode == 78, (command, result.stderr)
            assert "state.url" in result.stderr and "hunter22" not in result.stdout + result.stderr


def _toml_of(path: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(path.read_text())


def test_retention_runs_on_one_replica_at_a_time(pg_url):
    import asyncio

    from watcher.daemon.retention import RetentionJob
    from watcher.store.postgres.leases import AdvisoryGate
    from watcher.store.postgres.store import PostgresStore

    first, second = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        gate_a, gate_b = AdvisoryGate(first.pool), AdvisoryGate(second.pool)
        assert gate_a.acquire()
        assert not gate_b.acquire()  # held by the other replica: never waits
        calls: list[str] = []

        async def in_store(fn: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(getattr(fn, "__name__", ""))
            return fn(*args, **kwargs)

        job = RetentionJob(store=second, in_store=in_store, retain_days=1, gate=gate_b)
        report = asyncio.run(job.run_once())
        assert report is not None and report.events == 0 and "prune" not in calls
        gate_a.release()
        asyncio.run(job.run_once())
        assert "prune" in calls
        assert gate_a.acquire()  # job released the lock after its pass
        gate_a.release()
    finally:
        first.close()
        second.close()
