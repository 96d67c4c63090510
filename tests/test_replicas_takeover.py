"""A fine-tune taken over while the store still fails (right after a database outage) ends up polled: its change
is announced once (issue 15, items 0 and 4). The lease table is the keeper tests' in-memory fake; the store is
real (SQLite stands in for the shared database: the takeover path is the same), behind a wrapper that fails the
takeover's first read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from conftest import TOKEN, base_config
from test_replicas_keeper import FakeLeases

from watcher.config.load import parse_config
from watcher.daemon.lifecycle_jobs import LifecycleJobs
from watcher.daemon.poller import Watcher
from watcher.daemon.replicas.keeper import LeaseKeeper
from watcher.daemon.replicas.wiring import join
from watcher.errors import StoreError
from watcher.hub.client import HubClient
from watcher.store import SqliteStore, Store
from watcher.store.replicas import ReplicaStore
from watcher.testing.simhub import SimHub

KEY = "acme/bot/ft_1"
FT = {"namespace": "acme", "repo": "bot", "id": "ft_1"}


class FlakyReads:
    """The store, whose next `fail` reads of state (statuses, lifecycle records) raise StoreError."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.fail = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _read(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.fail:
            self.fail -= 1
            raise StoreError("cannot read state: the PostgreSQL database is unreachable (OperationalError)")
        return getattr(self.store, name)(*args, **kwargs)

    def statuses(self, *args: Any, **kwargs: Any) -> Any:
        return self._read("statuses", *args, **kwargs)

    def load_lifecycle(self, *args: Any, **kwargs: Any) -> Any:
        return self._read("load_lifecycle", *args, **kwargs)


async def test_a_fine_tune_whose_takeover_read_failed_is_still_polled_and_its_change_announced_once(
    hub: SimHub, tmp_path: Path
) -> None:
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(KEY, 100, loss=2.5)
    hub.add_checkpoint(KEY, 200, loss=2.0)
    config = parse_config(base_config(hub, tmp_path, fine_tunes=[FT]), source="test.toml", directory=tmp_path)
    sqlite = SqliteStore(tmp_path / "w.db")
    # the previous owner baselined it before the outage
    before = Watcher(config=config, store=sqlite, client=HubClient(base_url=hub.url, token=TOKEN, timeout_s=2.0))
    await before.poll(KEY)
    await before.aclose()
    hub.set_deployment_status(KEY, 200, "DEPLOYING")  # changed during the outage

    store = FlakyReads(SqliteStore(tmp_path / "w.db"))
    keeper = LeaseKeeper(FakeLeases("r2", {KEY: ("r1-expired", 3)}, ["r2"]), lease_s=15, renew_s=5)
    watcher = Watcher(
        config=config,
        store=cast(Store, store),
        client=HubClient(base_url=hub.url, token=TOKEN, timeout_s=2.0),
        ownership=keeper,
    )
    lifecycle = LifecycleJobs(watcher)
    scheduled: list[set[str]] = []
    join(
        keeper,
        cast(ReplicaStore, store),
        watcher,
        lifecycle,
        reschedule=lambda: scheduled.append(set(lifecycle.wanted(watcher.config))),
        wake=lambda: None,
    )
    keeper.leases.table[KEY] = (None, 3)  # the old owner's lease expired: free to take over
    try:
        store.fail = 1  # the store's pool is not back yet when the takeover reads the fine-tune's state
        for _ in range(3):  # the lease rounds go on (a failed round is reported, the next one runs)
            try:
                await keeper.step()
            except StoreError:
                pass
        assert keeper.owns(KEY)
        assert scheduled and KEY in scheduled[-1], "leased (and renewed), yet never scheduled: nobody polls it"
        await watcher.poll(KEY)
        await watcher.poll(KEY)
        announced = sorted(event.type for _, event in sqlite.events_after(0))
        assert announced == ["checkpoint.deployment_changed", "checkpoint.updated"]
    finally:
        await watcher.aclose()
        sqlite.close()
