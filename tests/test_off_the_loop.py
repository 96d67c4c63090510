"""No store call on the event loop's thread: a database that stops answering (a network partition) must never
freeze the loop, so every poll and delivery goes on. The PostgreSQL pool is watched: a connection taken or given
back on a thread that runs an event loop is recorded."""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wait_for

from watcher.daemon.retention import RetentionJob
from watcher.store.postgres.leases import AdvisoryGate
from watcher.store.postgres.store import PostgresStore
from watcher.store.thread import StoreThread


class LoopWatch:
    """A psycopg_pool ConnectionPool seen through: notes each connection taken or put back on a loop's thread."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.on_loop: list[str] = []

    def _note(self, what: str) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # a thread without a running loop: the store's thread, an executor's
        self.on_loop.append(what)

    def connection(self, *args: Any, **kwargs: Any) -> Any:
        self._note("connection")
        return self._pool.connection(*args, **kwargs)

    def getconn(self, *args: Any, **kwargs: Any) -> Any:
        self._note("getconn")
        return self._pool.getconn(*args, **kwargs)

    def putconn(self, conn: Any) -> None:
        self._note("putconn")
        self._pool.putconn(conn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


@pytest.fixture
def watched(pg_url: str) -> Iterator[tuple[PostgresStore, LoopWatch]]:
    store = PostgresStore(pg_url)
    watch = LoopWatch(store._pool)
    store._pool = watch  # type: ignore[assignment]
    try:
        yield store, watch
    finally:
        store._pool = watch._pool
        store.close()


def test_the_watch_sees_a_call_on_the_loop(watched: tuple[PostgresStore, LoopWatch]) -> None:
    store, watch = watched

    async def on_the_loop() -> None:
        store.outbox_stats()

    asyncio.run(on_the_loop())
    assert watch.on_loop == ["connection"]


def test_a_retention_pass_takes_and_gives_back_its_gate_off_the_loop(watched: tuple[PostgresStore, LoopWatch]) -> None:
    store, watch = watched
    thread = StoreThread()
    job = RetentionJob(store=store, in_store=thread, retain_days=1, gate=store.retention_gate())
    try:
        assert asyncio.run(job.run_once()) is not None
    finally:
        thread.close()
    assert watch.on_loop == []
    gate = AdvisoryGate(watch._pool)
    assert gate.acquire()  # given back
    gate.release()


def test_a_cancelled_retention_pass_gives_its_gate_back_off_the_loop(watched: tuple[PostgresStore, LoopWatch]) -> None:
    store, watch = watched
    thread = StoreThread()
    pruning = asyncio.Event()

    async def in_store(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn == store.prune:  # a long prune: still running when the daemon shuts down
            pruning.set()
            await asyncio.Event().wait()
        return await thread(fn, *args, **kwargs)

    job = RetentionJob(store=store, in_store=in_store, retain_days=1, gate=store.retention_gate())

    async def cancelled() -> None:
        task = asyncio.create_task(job.run_once())
        await pruning.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(cancelled())
    finally:
        thread.close()
    assert watch.on_loop == []
    gate = AdvisoryGate(watch._pool)
    wait_for(gate.acquire, what="the gate given back")
    gate.release()


class PoolWatch:
    """Every psycopg pool of this process watched: a connection taken on a thread that runs an event loop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from psycopg_pool import ConnectionPool

        self.on_loop: list[str] = []
        for name in ("getconn", "putconn"):  # every use of a pooled connection starts and ends with these
            monkeypatch.setattr(ConnectionPool, name, self._watched(getattr(ConnectionPool, name)))

    def _watched(self, method: Any) -> Any:
        def watched(pool: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                self.on_loop.append("".join(traceback.format_stack(limit=12)))
            return method(pool, *args, **kwargs)

        return watched


def test_a_replica_daemon_makes_no_store_call_on_its_loop(
    hub: Any, tmp_path: Any, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import base_config, write_config
    from prometheus_client import CollectorRegistry

    from watcher.config.load import load_config
    from watcher.daemon.app import App
    from watcher.daemon.runtime import resolve_all

    watch = PoolWatch(monkeypatch)
    ft = hub.add_fine_tune("acme", "bot", "ft_1", name="run")
    hub.add_checkpoint(ft, 100, loss=1.0)
    data = base_config(
        hub,
        tmp_path,
        fine_tunes=[{"namespace": "acme", "repo": "bot", "id": "ft_1"}],
        notifiers=[{"name": "log", "type": "log"}],
    )
    data["state"] = {"url": pg_url, "lease_s": 3, "renew_s": 1, "replica": "a", "retain_days": 1}
    config = load_config(str(write_config(tmp_path / "a.toml", data)))
    events: list[Any] = []
    app = App(config, resolve_all(config), registry=CollectorRegistry(), sinks=[events.append])  # as `run` does
    asyncio.run(_drive(app, ft, hub, events))
    assert watch.on_loop == [], watch.on_loop[0]


async def _drive(app: Any, ft: Any, hub: Any, events: list[Any]) -> None:
    task = asyncio.create_task(app.run())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not (app.started and app.retention.runs and app.watcher.store.load_cached("acme/bot/ft_1").baselined):
            assert not task.done() and loop.time() < deadline, "not started in time"
            await asyncio.sleep(0.05)
        hub.add_checkpoint(ft, 200, loss=0.5)  # a change: committed, then delivered (fenced) by this replica
        deadline = loop.time() + 30
        while not any(event.type == "checkpoint.created" for event in events):
            assert loop.time() < deadline, "no change announced in time"
            await asyncio.sleep(0.05)
        assert app.keeper is not None
        await app.keeper.step()  # a lease round too
    finally:
        app.stop.set()
        await asyncio.wait_for(task, 30)
