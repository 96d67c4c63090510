"""A poll whose commit fails (refused, fenced, or lost with the connection after the database committed it), or a
failed batch of poll times, leaves nothing in memory that hides a change from a later poll: the change the Hub
made meanwhile is announced exactly once, on every store (issue 15, item 0).

The failure is injected at the store protocol boundary: a store wrapper that fails the next apply_poll or
flush_touches, before or after the real call."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from conftest import TOKEN, base_config

from watcher.config.load import parse_config
from watcher.daemon.poller import Watcher
from watcher.errors import LeaseLost, StoreError
from watcher.hub.client import HubClient
from watcher.store import Store
from watcher.testing.simhub import SimHub

from .conftest import Opener
from .support import T0, counter_ids

KEY = "acme/bot/ft_1"
FT = {"namespace": "acme", "repo": "bot", "id": "ft_1"}


class FailingStore:
    """A store that fails its next `apply_poll` (or `flush_touches`) once: `before` the real call (nothing was
    committed), or `after` it (committed, but the caller hears of a failure, as when the connection dies at
    COMMIT); every other call goes through."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.fail: dict[str, tuple[str, Exception]] = {}  # method -> (when, error)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        when, error = self.fail.pop(name, ("", None))
        if when == "before":
            raise error  # type: ignore[misc]
        result = getattr(self.store, name)(*args, **kwargs)
        if when == "after":
            raise error  # type: ignore[misc]
        return result

    def apply_poll(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("apply_poll", *args, **kwargs)

    def flush_touches(self) -> Any:
        return self._call("flush_touches")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _watcher(hub: SimHub, tmp_path: Path, store: FailingStore) -> Watcher:
    config = parse_config(base_config(hub, tmp_path, fine_tunes=[FT]), source="test.toml", directory=tmp_path)
    clock = Clock()
    client = HubClient(base_url=hub.url, token=TOKEN, timeout_s=2.0, retry_budget_s=2.0, clock=clock)
    return Watcher(config=config, store=cast(Store, store), client=client, clock=clock)


def _announced(store: Store) -> list[tuple[str, int]]:
    return sorted(
        (event.type, event.data["checkpoint"]["step"])
        for _, event in store.events_after(0, limit=1000)
        if "checkpoint" in event.data
    )


FAILURES = {
    "refused": ("before", StoreError("cannot commit poll: the database is unreachable")),
    "lost at COMMIT": ("after", StoreError("cannot commit poll: the connection was lost")),
    "fenced": ("before", LeaseLost("lease lost; poll not committed")),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("unchanged_polls_first", [False, True])
async def test_a_change_whose_commit_failed_is_announced_exactly_once_afterwards(
    hub: SimHub, tmp_path: Path, store_factory: Opener, failure: str, unchanged_polls_first: bool
) -> None:
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(KEY, 100, loss=2.5)
    hub.add_checkpoint(KEY, 200, loss=2.0)
    store = FailingStore(store_factory(new_id=counter_ids()))
    watcher = _watcher(hub, tmp_path, store)
    try:
        await watcher.poll(KEY)  # the baseline
        if unchanged_polls_first:  # the fast path has a batch of poll times and a cached body hash
            await watcher.poll(KEY)
            await watcher.flush_touches()
            await watcher.poll(KEY)
        hub.set_deployment_status(KEY, 200, "DEPLOYING")  # the Hub changes during the outage
        store.fail["apply_poll"] = FAILURES[failure]
        failed = await watcher.poll(KEY)
        assert failed is not None and failed.error is not None
        await watcher.flush_touches()
        for _ in range(3):  # the database is back: the next polls (and batches) see the change once
            await watcher.poll(KEY)
            await watcher.flush_touches()
        assert _announced(store.store) == [("checkpoint.deployment_changed", 200), ("checkpoint.updated", 200)]
    finally:
        await watcher.aclose()


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_failed_batch_of_poll_times_hides_no_later_change(
    hub: SimHub, tmp_path: Path, store_factory: Opener, when: str
) -> None:
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(KEY, 100, loss=2.5)
    hub.add_checkpoint(KEY, 200, loss=2.0)
    store = FailingStore(store_factory(new_id=counter_ids()))
    watcher = _watcher(hub, tmp_path, store)
    try:
        await watcher.poll(KEY)
        await watcher.poll(KEY)  # unchanged: a poll time batched
        store.fail["flush_touches"] = (when, StoreError("cannot record poll times: the connection was lost"))
        await watcher.flush_touches()
        hub.set_deployment_status(KEY, 200, "DEPLOYING")
        for _ in range(3):
            await watcher.poll(KEY)
            await watcher.flush_touches()
        assert _announced(store.store) == [("checkpoint.deployment_changed", 200), ("checkpoint.updated", 200)]
    finally:
        await watcher.aclose()
