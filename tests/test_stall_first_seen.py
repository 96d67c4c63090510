"""A checkpoint the Hub gives no created_at (issue 15, item 16): when the watcher first saw it stands in, in the
metric oxen_fine_tune_latest_checkpoint_timestamp_seconds as in fine_tune.stalled's last_checkpoint_at."""

from __future__ import annotations

from pathlib import Path

from conftest import TOKEN, base_config
from prometheus_client import CollectorRegistry

from watcher.config.load import parse_config
from watcher.core.events import rfc3339
from watcher.core.models import Event
from watcher.daemon.lifecycle_jobs import LifecycleJobs
from watcher.daemon.poller import Watcher
from watcher.hub.client import HubClient
from watcher.observe.metrics import Metrics
from watcher.store import SqliteStore
from watcher.testing.simhub import SimHub

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def test_without_created_at_the_metric_and_the_stall_use_when_the_checkpoint_was_first_seen(
    hub: SimHub, tmp_path: Path
) -> None:
    key = hub.add_fine_tune("acme", "bot", "ft_1")
    hub.set_status(key, "running")
    hub.add_checkpoint(key, 100, loss=1.0, created_at=None)
    sections = base_config(
        hub,
        tmp_path,
        fine_tunes=[{"namespace": "acme", "repo": "bot", "id": "ft_1"}],
        lifecycle={"stall_after_s": 600},
    )
    config = parse_config(sections, source="test.toml", directory=tmp_path)
    metrics = Metrics(CollectorRegistry(), version="test")
    clock = Clock()
    events: list[Event] = []
    watcher = Watcher(
        config=config,
        store=SqliteStore(tmp_path / "w.db"),
        client=HubClient(base_url=hub.url, token=TOKEN, timeout_s=5.0),
        metrics=metrics,
        clock=clock,
        sinks=[events.append],
    )
    lifecycle = LifecycleJobs(watcher, clock=clock)

    def latest_at() -> float | None:
        labels = {"namespace": "acme", "repo": "bot", "fine_tune_id": "ft_1", "name": "ft_1"}
        return metrics.registry.get_sample_value("oxen_fine_tune_latest_checkpoint_timestamp_seconds", labels)

    try:
        await lifecycle.sweep()  # its status: running
        clock.now = T0 + 10
        await lifecycle.poll(key)  # the first poll sees checkpoint 100, without created_at
        assert latest_at() == T0 + 10
        for offset in range(20, 2000, 30):  # the sweep checks for a stall; no new checkpoint comes
            clock.now = T0 + offset
            await lifecycle.sweep()
        stalls = [event for event in events if event.type == "fine_tune.stalled"]
        assert [event.data["last_checkpoint_at"] for event in stalls] == [rfc3339(T0 + 10)]
        assert latest_at() == T0 + 10
    finally:
        await watcher.aclose()
