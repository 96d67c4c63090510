"""Start-up stays linear in the number of listed fine-tunes (issue 15, item 17): every fine-tune's first status
and first poll are changes, and each used to reschedule every job and rewrite every lifecycle gauge; now the
changes of a sweep make one reschedule, and those of polls finishing one by one make one per RESCHEDULE_AFTER_S,
while each fine-tune's own status gauge is set at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from conftest import TOKEN, base_config
from prometheus_client import CollectorRegistry

from watcher.config.load import parse_config
from watcher.daemon.lifecycle_jobs import LifecycleJobs
from watcher.daemon.poller import Watcher
from watcher.hub.client import HubClient
from watcher.observe.metrics import Metrics
from watcher.store import SqliteStore
from watcher.testing.simhub import SimHub

FINE_TUNES = 40


async def test_the_first_statuses_and_polls_of_many_fine_tunes_reschedule_once_per_batch_not_once_each(
    hub: SimHub, tmp_path: Path
) -> None:
    listed = []
    for index in range(FINE_TUNES):
        key = hub.add_fine_tune("acme", "bot", f"ft_{index}")
        hub.add_checkpoint(key, 100, loss=1.0)
        listed.append({"namespace": "acme", "repo": "bot", "id": f"ft_{index}"})
    config = parse_config(base_config(hub, tmp_path, fine_tunes=listed), source="test.toml", directory=tmp_path)
    metrics = Metrics(CollectorRegistry(), version="test")
    watcher = Watcher(
        config=config,
        store=SqliteStore(tmp_path / "w.db"),
        client=HubClient(base_url=hub.url, token=TOKEN, timeout_s=5.0),
        metrics=metrics,
    )
    reschedules: list[float] = []
    rescheduled = asyncio.Event()

    def reschedule() -> None:
        reschedules.append(time.monotonic())
        rescheduled.set()

    lifecycle = LifecycleJobs(watcher, on_change=reschedule)
    try:
        started = time.monotonic()
        await asyncio.gather(*(lifecycle.poll(key) for key in watcher.fine_tunes))  # the first polls
        await asyncio.wait_for(rescheduled.wait(), 10)  # the polls' changes: rescheduled shortly after
        elapsed = time.monotonic() - started
        assert 1 <= len(reschedules) <= 2 + elapsed  # at most one per RESCHEDULE_AFTER_S (1 s), not one each

        reschedules.clear()
        await lifecycle.sweep()  # every fine-tune's first status, read in one sweep
        assert len(reschedules) == 1
        running = [
            sample
            for family in metrics.registry.collect()
            if family.name == "oxen_fine_tune_status"
            for sample in family.samples
            if sample.value == 1
        ]
        assert len(running) == FINE_TUNES  # each one's status gauge, set as its status came
    finally:
        await watcher.aclose()
