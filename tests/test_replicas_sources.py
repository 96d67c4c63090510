"""Replicas and [[discover]] sources end to end: one replica at a time reads a source's list, every replica claims
its share of what the source found, a dead reader's source is taken over within the lease, a stale reader's
commit is fenced, and `once` reads only a source no replica reads (real `oxen-watcher run` processes, and the
daemon and `once` in-process, on a throwaway PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
from conftest import base_config, wait_for, write_config
from prometheus_client import CollectorRegistry
from test_lifecycle_daemon import running, until
from test_replicas import LEASE_S, RENEW_S, Replica, _events

from watcher.config.load import load_config
from watcher.daemon.app import App, resolve_all
from watcher.daemon.lifecycle_jobs import LifecycleJobs
from watcher.daemon.replicas.wiring import claim_for_once
from watcher.daemon.runtime import build_runtime, open_state
from watcher.store.postgres.leases import PostgresLeases, is_source_lease
from watcher.store.postgres.store import PostgresStore
from watcher.testing.receiver import Receiver
from watcher.testing.simhub import SimHub

SOURCE = "source:acme/lab"
RUNS = [f"acme/lab/ft_{n}" for n in range(10)]


def _config(
    hub: SimHub, tmp_path: Path, pg_url: str, name: str, receiver: Receiver | None = None, **state: Any
) -> Path:
    data = base_config(
        hub,
        tmp_path,
        watch={"interval_s": 0.5, "jitter_s": 0, "baseline": True},
        discover=[{"name": "lab", "namespace": "acme", "repo": "lab", "interval_s": 0.5}],
        lifecycle={"status_interval_s": 2, "idle_interval_s": 30},
        notifiers=[{"name": "ci", "type": "webhook", "url": receiver.url, "timeout_s": 5}] if receiver else [],
    )
    data["state"] = {"url": pg_url, "lease_s": LEASE_S, "renew_s": RENEW_S, "replica": name, **state}
    return write_config(tmp_path / f"{name}.toml", data)


def _seed(hub: SimHub) -> None:
    for key in RUNS:
        hub.add_fine_tune("acme", "lab", key.rsplit("/", 1)[1])
        hub.add_checkpoint(key, 1, loss=1.0)


def _leases(pg_url: str) -> tuple[str | None, Counter[str | None]]:
    """(the source's lease owner, fine-tune leases per live owner)."""
    with psycopg.connect(pg_url, autocommit=True) as db:
        rows = db.execute("SELECT fine_tune_key, owner, expires_at > now() FROM leases").fetchall()
    source = next((owner for key, owner, live in rows if key == SOURCE and live), None)
    return source, Counter(owner for key, owner, live in rows if not is_source_lease(key) and live)


def _list_reads(replica: Replica) -> float:
    """oxen_watcher_hub_requests_total{endpoint="list"} of one replica (every outcome); 0 when never read."""
    return max(0.0, replica.metric("oxen_watcher_hub_requests_total", endpoint="list"))


def _count(config: Path, kind: str, fine_tune_id: str) -> int:
    return sum(1 for e in _events(config) if e["type"] == kind and e["data"]["fine_tune"]["id"] == fine_tune_id)


def test_one_replica_reads_a_source_both_share_its_runs_and_the_other_takes_it_over(hub, tmp_path, daemons, pg_url):
    _seed(hub)
    with Receiver() as receiver:
        a = Replica(daemons(_config(hub, tmp_path, pg_url, "a", receiver)))
        b = Replica(daemons(_config(hub, tmp_path, pg_url, "b", receiver)))
        # both claim a fair share of the ten discovered runs, though only one of them reads the list
        wait_for(lambda: _leases(pg_url)[1] == Counter({"a": 5, "b": 5}), timeout=30, what="5 runs each")
        owner = _leases(pg_url)[0]
        assert owner in ("a", "b")
        reader, other = (a, b) if owner == "a" else (b, a)
        wait_for(lambda: a.ready() and b.ready(), what="both ready (each polled what it owns)")
        reads = _list_reads(reader)
        wait_for(lambda: _list_reads(reader) >= reads + 4, what="the reader reading on")
        assert _list_reads(other) == 0  # the other never read the list
        # and the Hub saw no other reader: every list request it answered is one the reader counted
        wait_for(lambda: len(hub.requests("acme/lab")) == _list_reads(reader), what="the Hub's count")
        assert reader.owned() == 6 and other.owned() == 5  # leases_owned counts the source's lease too
        # a run started now is discovered once, and claimed by one of them: its checkpoint announced once
        new = hub.add_fine_tune("acme", "lab", "ft_new")
        hub.add_checkpoint(new, 7, loss=0.5)
        config = a.daemon.config
        wait_for(lambda: _count(config, "checkpoint.created", "ft_new") >= 1, timeout=30, what="ft_new's checkpoint")
        wait_for(lambda: sum(_leases(pg_url)[1].values()) == 11, what="ft_new claimed")
        # the reader dies: the other takes the source over within the lease, and reads and shares it from then on
        reader.daemon.kill9()
        killed_at = time.monotonic()
        wait_for(lambda: _leases(pg_url)[0] == other.daemon.config.stem, timeout=LEASE_S + RENEW_S + 2, what="takeover")
        took = time.monotonic() - killed_at
        assert took <= LEASE_S + RENEW_S + 2
        wait_for(lambda: _list_reads(other) > 0, what="the new reader reading")
        later = hub.add_fine_tune("acme", "lab", "ft_later")
        hub.add_checkpoint(later, 3, loss=0.4)
        wait_for(
            lambda: _count(config, "checkpoint.created", "ft_later") >= 1, timeout=30, what="ft_later's checkpoint"
        )
        wait_for(lambda: _leases(pg_url)[1] == Counter({other.daemon.config.stem: 12}), what="every run re-owned")
        for run in ("ft_new", "ft_later"):
            assert _count(config, "fine_tune.discovered", run) == 1
        assert (
            _count(config, "checkpoint.created", "ft_new") == 1
            and _count(config, "checkpoint.created", "ft_later") == 1
        )
        assert not any(_count(config, "fine_tune.discovered", key.rsplit("/", 1)[1]) for key in RUNS)  # the baseline
        wait_for(
            lambda: {r.webhook_id for r in receiver.deliveries()} >= {e["id"] for e in _events(config)},
            timeout=30,
            what="every event delivered",
        )
        assert other.metric("oxen_watcher_lease_changes_total", change="fenced") <= 0
        assert other.daemon.terminate() == 0


async def test_a_stale_reader_commits_nothing_and_rereads_the_stored_state_when_it_owns_the_source_again(
    hub: SimHub, tmp_path: Path, pg_url: str
) -> None:
    _seed(hub)
    # long leases: the read, not a renewal round, is what finds the lease gone
    path = _config(hub, tmp_path, pg_url, "a", lease_s=60, renew_s=20)
    config = load_config(str(path))
    app = App(config, resolve_all(config), config_path=str(path), registry=CollectorRegistry())
    task = asyncio.create_task(app.run())
    try:
        await until(lambda: app.started and app.lifecycle.baselined("lab"), what="the baseline read")
        assert app.keeper is not None and SOURCE in app.keeper.sources_owned
        with psycopg.connect(pg_url, autocommit=True) as db:  # another replica took the source over meanwhile
            db.execute("UPDATE leases SET owner = 'thief', epoch = epoch + 1 WHERE fine_tune_key = %s", (SOURCE,))
        hub.add_fine_tune("acme", "lab", "ft_new")
        registry = app.metrics.registry
        fenced = lambda: registry.get_sample_value("oxen_watcher_lease_changes_total", {"change": "fenced"})
        await until(lambda: (fenced() or 0) >= 1, what="a fenced source read")
        assert SOURCE not in app.keeper.sources_owned
        assert app.driver.schedule.interval_of("\x00source:lab") is None  # it no longer reads the list
        reads = len(hub.requests("acme/lab"))
        assert app.watcher.store.recent_events(limit=50, type_glob="fine_tune.discovered") == []
        assert "acme/lab/ft_new" not in app.watcher.discovered
        with psycopg.connect(pg_url, autocommit=True) as db:  # the thief leaves
            db.execute("UPDATE leases SET owner = NULL, expires_at = '-infinity' WHERE fine_tune_key = %s", (SOURCE,))
        await app.keeper.step()
        assert SOURCE in app.keeper.sources_owned
        await until(
            lambda: app.watcher.store.recent_events(limit=50, type_glob="fine_tune.discovered"), what="the discovery"
        )
        await until(lambda: "acme/lab/ft_new" in app.watcher.discovered, what="watched")
        assert len(hub.requests("acme/lab")) > reads  # read again, from the stored state
        await until(lambda: len(hub.requests("acme/lab")) >= reads + 4, what="more reads")
        assert fenced() == 1
        (found,) = app.watcher.store.recent_events(limit=50, type_glob="fine_tune.discovered")
        assert found.data["fine_tune"]["id"] == "ft_new"
    finally:
        app.stop.set()
        await asyncio.wait_for(task, 30)


async def test_once_reads_only_a_source_no_running_replica_reads_and_releases_its_lease(
    hub: SimHub, tmp_path: Path, pg_url: str
) -> None:
    _seed(hub)
    config = load_config(str(_config(hub, tmp_path, pg_url, "a")))
    secrets = resolve_all(config)

    async def once() -> int:
        """`once`'s source reads; returns how many list requests the Hub saw."""
        before = len(hub.requests("acme/lab"))
        state = open_state(config, secrets.state_url)
        leases = claim_for_once(state, config)
        assert leases is not None
        watcher, dispatcher = build_runtime(
            config, store=state, token=secrets.hub_token, secrets=secrets.notifiers, ownership=leases
        )
        lifecycle = LifecycleJobs(watcher)
        try:
            await lifecycle.once()
        finally:
            leases.leave()
            await dispatcher.aclose()
            await watcher.aclose()
        return len(hub.requests("acme/lab")) - before

    store = PostgresStore(secrets.state_url or "")
    daemon = PostgresLeases(store.pool, replica="daemon", lease_s=60)
    try:
        assert [lease.key for lease in daemon.claim([SOURCE]).acquired] == [SOURCE]
        assert await once() == 0  # a running replica reads it
        assert store.load_source("lab").baselined is False
        daemon.leave()
        assert await once() == 1
        assert store.load_source("lab").baselined is True
        assert _leases(pg_url)[0] is None  # released on exit: the replicas take it at their next round
    finally:
        store.close()


async def test_a_reload_adds_and_removes_a_source_on_a_replica(hub: SimHub, tmp_path: Path, pg_url: str) -> None:
    key = hub.add_fine_tune("acme", "lab", "ft_a")
    other = hub.add_fine_tune("acme", "bot", "ft_b")
    path = _config(hub, tmp_path, pg_url, "a")
    first = tomllib.loads(path.read_text())
    async with running(path) as (app, events):
        assert app.keeper is not None
        await until(lambda: key in app.watcher.fine_tunes, what="the first source's run, claimed")
        added = {"name": "bot", "namespace": "acme", "repo": "bot", "interval_s": 0.5}
        both = {**first, "discover": [*first["discover"], added]}
        write_config(path, both)
        assert await app.reload()
        await until(lambda: other in app.watcher.fine_tunes, what="the added source's run, claimed")
        assert sorted(app.keeper.sources_owned) == ["source:acme/bot", SOURCE]
        write_config(path, {**first, "discover": both["discover"][1:]})
        assert await app.reload()
        await until(lambda: key not in app.watcher.fine_tunes, what="the removed source's run goes")
        # the fine-tune's lease and the source's go in separate steps of a round: wait for both
        await until(
            lambda: (
                _leases(pg_url) == (None, Counter({"a": 1})) and list(app.keeper.sources_owned) == ["source:acme/bot"]
            ),
            what="its leases released",
        )
        assert other in app.watcher.fine_tunes
        assert app.watcher.store.load_source("lab").baselined  # its state is kept
    assert not [event for event in events if event.type == "fine_tune.discovered"]


def test_two_replicas_with_discovery_poll_at_most_a_quarter_of_polling_everything(hub, tmp_path, daemons, pg_url):
    """Issue 9's goal for two replicas sharing a source (bench/lifecycle.py's mix: a tenth running, the rest
    finished): over a steady window, the simulated Hub sees at most 25 % of the requests of polling every
    fine-tune every interval_s. Only one replica reads the list; the other takes its owned fine-tunes' statuses
    from that read (stored with the source's findings) instead of one GET each per status_interval_s."""
    fine_tunes, interval_s = 60, 2.0
    now = time.time()
    for index in range(fine_tunes):
        running_ = index % 10 == 0
        key = hub.add_fine_tune(
            "acme",
            "lab",
            f"ft_{index}",
            status="running" if running_ else "completed",
            finished_at=None if running_ else now - 3600,
        )
        hub.add_checkpoint(key, 100, loss=1.0)
    replicas = []
    for name in ("a", "b"):
        data = base_config(
            hub,
            tmp_path,
            watch={"interval_s": interval_s, "jitter_s": 0, "baseline": True},
            discover=[{"name": "lab", "namespace": "acme", "repo": "lab", "interval_s": interval_s}],
            lifecycle={"status_interval_s": 2 * interval_s, "idle_interval_s": 10 * interval_s},
        )
        data["state"] = {"url": pg_url, "lease_s": LEASE_S, "renew_s": RENEW_S, "replica": name}
        replicas.append(Replica(daemons(write_config(tmp_path / f"{name}.toml", data))))
    half = fine_tunes // 2
    wait_for(lambda: _leases(pg_url)[1] == Counter({"a": half, "b": half}), timeout=60, what="30 fine-tunes each")
    wait_for(lambda: all(replica.ready() for replica in replicas), timeout=60, what="both ready")
    # a steady window of 15 list reads (30 s), begun one list read after the last first poll
    start = len(hub.requests("acme/lab")) + 1
    wait_for(lambda: len(hub.requests("acme/lab")) >= start + 15, timeout=120, what="15 list reads")
    lists = hub.requests("acme/lab")
    begin, end = lists[start - 1].at, lists[start + 14].at
    window = [record for record in hub.requests() if begin <= record.at < end]
    by_endpoint = Counter(record.endpoint for record in window)
    yardstick = fine_tunes * (end - begin) / interval_s  # every fine-tune's checkpoints every interval_s
    share = len(window) / yardstick
    print(f"2 replicas: {len(window)} requests in {end - begin:.1f} s, {share:.1%} of polling all; {dict(by_endpoint)}")
    assert share <= 0.25, (share, dict(by_endpoint), round(end - begin, 1))
    # the statuses came from the list: no replica GETs them one by one (at most a late read now and then)
    assert by_endpoint["fine_tune"] <= 0.02 * yardstick, dict(by_endpoint)
    for replica in replicas:
        assert replica.daemon.terminate() == 0, replica.daemon.output()
