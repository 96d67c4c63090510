"""Issue 9 end to end in the daemon (App in-process against the simulated Hub): discovery, status changes,
the final checkpoint, stalls, a fine-tune both listed and discovered, reloads adding and removing a source."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import Daemon, base_config, cli, wait_for, write_config
from prometheus_client import CollectorRegistry, generate_latest

from watcher.config.load import load_config
from watcher.core.models import Event
from watcher.daemon.app import App, resolve_all
from watcher.store import SqliteReports
from watcher.testing.simhub import SimHub


async def until(condition: Callable[[], Any], *, timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


def config_of(hub: SimHub, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    sections.setdefault("lifecycle", {"status_interval_s": 0.5, "idle_interval_s": 30})
    sections.setdefault("discover", [{"name": "support", "namespace": "acme", "repo": "bot", "interval_s": 0.5}])
    return base_config(hub, tmp_path, **sections)


@asynccontextmanager
async def running(path: Path) -> AsyncIterator[tuple[App, list[Event]]]:
    events: list[Event] = []
    config = load_config(str(path))
    app = App(config, resolve_all(config), config_path=str(path), registry=CollectorRegistry(), sinks=[events.append])
    task = asyncio.create_task(app.run())
    try:
        await until(lambda: app.started, what="start")
        yield app, events
    finally:
        app.stop.set()
        await asyncio.wait_for(task, 30)


def of_type(events: list[Event], kind: str, fine_tune_id: str | None = None) -> list[Event]:
    return [e for e in events if e.type == kind and (fine_tune_id is None or e.data["fine_tune"]["id"] == fine_tune_id)]


async def test_a_new_source_is_baselined_silently_and_later_runs_are_announced_with_their_checkpoints(
    hub: SimHub, tmp_path: Path
) -> None:
    old = hub.add_fine_tune("acme", "bot", "ft_old", name="old-run")
    hub.add_checkpoint(old, 100, loss=1.0)
    path = write_config(tmp_path / "w.toml", config_of(hub, tmp_path))
    async with running(path) as (app, events):
        await until(lambda: "acme/bot/ft_old" in app.watcher.fine_tunes, what="the baseline read")
        new = hub.add_fine_tune("acme", "bot", "ft_new", name="new-run", created_by="alice")
        hub.add_checkpoint(new, 10, loss=2.0)
        (found,) = await until(lambda: of_type(events, "fine_tune.discovered"), what="discovery")
        assert found.data["source"] == "support" and found.data["created_by"] == "alice"
        assert found.data["status"] == "running" and found.data["fine_tune"]["name"] == "new-run"
        # a discovered run is new: its checkpoints are announced, not baselined
        await until(lambda: of_type(events, "checkpoint.created", "ft_new"), what="its checkpoint")
        assert app.watcher.fine_tunes["acme/bot/ft_new"].source == "support"
        text = generate_latest(app.metrics.registry).decode()
        assert 'oxen_watcher_watched_fine_tunes{source="support"} 2.0' in text
        assert 'status="running"' in text and 'oxen_watcher_hub_requests_total{endpoint="list",outcome="ok"}' in text
        assert 'oxen_watcher_hub_requests_total{endpoint="checkpoints",outcome="ok"}' in text
    assert not of_type(events, "fine_tune.discovered", "ft_old")
    assert not of_type(events, "checkpoint.created", "ft_old")
    assert not of_type(events, "fine_tune.status_changed")


@pytest.mark.parametrize(
    ("outcome", "error"), [("completed", None), ("errored", "CUDA out of memory"), ("stopped", None)]
)
async def test_the_final_checkpoint_is_committed_before_the_terminal_status_event(
    hub: SimHub, tmp_path: Path, outcome: str, error: str | None
) -> None:
    sections = config_of(hub, tmp_path, lifecycle={"status_interval_s": 0.5, "idle_interval_s": 3600})
    # checkpoints every 60 s: only the final poll can see them in time
    sections["watch"]["interval_s"] = 60
    path = write_config(tmp_path / "w.toml", sections)
    async with running(path) as (app, events):
        await until(lambda: app.lifecycle.baselined("support"), what="the baseline read")
        key = hub.add_fine_tune("acme", "bot", "ft_run", name="run")
        for step, loss in ((100, 1.5), (200, 0.7), (300, 0.9)):
            hub.add_checkpoint(key, step, loss=loss)
        await until(lambda: of_type(events, "fine_tune.discovered"), what="discovery")
        hub.set_status(key, outcome, error=error)
        (changed,) = await until(lambda: of_type(events, "fine_tune.status_changed"), what="the status change")
        store = app.watcher.store
        committed = store.recent_events(limit=20)
        # the status page's "Hub status" comes from the persisted lifecycle
        await until(lambda: SqliteReports(app.config.state_path()).summaries([key]).get(key), what="a summary")
        assert SqliteReports(app.config.state_path()).summaries([key])[key].hub_status == outcome
    data = changed.data
    assert data["previous_status"] == "running" and data["status"] == outcome
    assert data["checkpoints"] == 3 and data["latest_step"] == 300
    assert data["best_loss"] == 0.7 and data["best_step"] == 200
    assert data["error"] == (error if outcome == "errored" else None)
    assert data["duration_s"] is not None and data["finished_at"] and data["started_at"]
    order = [e.type for e in reversed(committed)]
    assert order.index("fine_tune.status_changed") > max(
        i for i, kind in enumerate(order) if kind == "checkpoint.created"
    )


async def test_every_status_transition_of_a_scripted_run_is_announced_once(hub: SimHub, tmp_path: Path) -> None:
    key = hub.add_fine_tune("acme", "bot", "ft_run", status="created")
    path = write_config(tmp_path / "w.toml", config_of(hub, tmp_path))
    async with running(path) as (app, events):
        await until(lambda: key in app.watcher.fine_tunes, what="the baseline read")
        await until(lambda: app.watcher.fine_tunes[key].lifecycle.state.status == "created", what="first status")
        hub.script_run(key, step_s=1.0, run_s=1.5, outcome="completed")
        await until(
            lambda: [e.data["status"] for e in of_type(events, "fine_tune.status_changed")][-1:] == ["completed"],
            what="the run's end",
        )
    pairs = [(e.data["previous_status"], e.data["status"]) for e in of_type(events, "fine_tune.status_changed")]
    assert pairs == [
        ("created", "tokenizing"),
        ("tokenizing", "enqueued"),
        ("enqueued", "running"),
        ("running", "completed"),
    ]


async def test_a_running_fine_tune_without_new_checkpoints_stalls_once(hub: SimHub, tmp_path: Path) -> None:
    key = hub.add_fine_tune("acme", "bot", "ft_run", name="run")
    sections = config_of(hub, tmp_path, lifecycle={"status_interval_s": 0.5, "stall_after_s": 1.5})
    path = write_config(tmp_path / "w.toml", sections)
    async with running(path) as (app, events):
        (stalled,) = await until(lambda: of_type(events, "fine_tune.stalled"), what="the stall")
        assert stalled.data["status"] == "running" and stalled.data["stalled_for_s"] >= 1.5
        hub.add_checkpoint(key, 100, loss=1.0)  # ends the stall ...
        await until(lambda: app.watcher.fine_tunes[key].lifecycle.state.newest_step == 100, what="the checkpoint")
        await until(lambda: len(of_type(events, "fine_tune.stalled")) == 2, what="... and a new one can begin")


async def test_a_fine_tune_listed_and_discovered_is_watched_once_with_the_listed_settings(
    hub: SimHub, tmp_path: Path
) -> None:
    key = hub.add_fine_tune("acme", "bot", "ft_both", name="hub-name")
    listed = {"namespace": "acme", "repo": "bot", "id": "ft_both", "name": "listed-name", "interval_s": 7}
    path = write_config(tmp_path / "w.toml", config_of(hub, tmp_path, fine_tunes=[listed]))
    async with running(path) as (app, _events):
        await until(lambda: app.lifecycle.baselined("support"), what="the first read")
        await until(lambda: key in app.watcher.discovered, what="the source sees it")
        assert list(app.watcher.fine_tunes) == [key]
        watched = app.watcher.fine_tunes[key]
        assert (watched.ref.name, watched.source, watched.interval_s) == ("listed-name", "config", 7)
        assert app.driver.schedule.interval_of(key) == 7


async def test_reload_adds_and_removes_a_source_keeping_its_state(hub: SimHub, tmp_path: Path) -> None:
    key = hub.add_fine_tune("acme", "bot", "ft_a")
    other = hub.add_fine_tune("acme", "lab", "ft_b")
    first = config_of(hub, tmp_path)
    path = write_config(tmp_path / "w.toml", first)
    async with running(path) as (app, events):
        await until(lambda: key in app.watcher.fine_tunes, what="the first source")
        both = {
            **first,
            "discover": [*first["discover"], {"name": "lab", "namespace": "acme", "repo": "lab", "interval_s": 0.5}],
        }
        write_config(path, both)
        assert await app.reload()
        await until(lambda: other in app.watcher.fine_tunes, what="the added source")
        assert app.watcher.fine_tunes[other].source == "lab"
        write_config(path, {**first, "discover": both["discover"][1:]})
        assert await app.reload()
        await until(lambda: key not in app.watcher.fine_tunes, what="the removed source's fine-tunes go")
        assert other in app.watcher.fine_tunes
        assert app.watcher.store.load_source("support").baselined  # its state is kept
        assert app.watcher.store.load_lifecycle([key])[key].state.status == "running"
    assert not of_type(events, "fine_tune.discovered")


def _events(config: Path) -> list[dict[str, Any]]:
    out = cli("events", "-c", str(config), "--json", "--type", "fine_tune.*", "--limit", "100").stdout
    return [orjson.loads(line) for line in out.splitlines()]


def _count(config: Path, kind: str, fine_tune_id: str) -> int:
    return sum(1 for e in _events(config) if e["type"] == kind and e["data"]["fine_tune"]["id"] == fine_tune_id)


def test_a_restart_while_a_run_completes_announces_it_exactly_once(
    hub: SimHub, tmp_path: Path, daemons: Callable[..., Daemon]
) -> None:
    run = hub.add_fine_tune("acme", "bot", "ft_run")
    hub.add_checkpoint(run, 100, loss=1.0)
    config = write_config(tmp_path / "w.toml", config_of(hub, tmp_path))
    daemon = daemons(config)
    status = lambda: [orjson.loads(line) for line in cli("status", "-c", str(config), "--json").stdout.splitlines()]
    wait_for(lambda: any(row["hub_status"] == "running" for row in status()), what="the baseline")
    hub.add_fine_tune("acme", "bot", "ft_new")
    wait_for(lambda: _count(config, "fine_tune.discovered", "ft_new"), what="a discovery")
    daemon.kill9()
    hub.add_checkpoint(run, 200, loss=0.5)
    hub.set_status(run, "completed")  # while nobody watches
    hub.add_fine_tune("acme", "bot", "ft_later")
    daemon = daemons(config)
    wait_for(lambda: _count(config, "fine_tune.status_changed", "ft_run"), what="the completion")
    wait_for(lambda: _count(config, "fine_tune.discovered", "ft_later"), what="the discovery made while down")
    daemon.kill9()
    daemon = daemons(config)
    lists = len(hub.requests("acme/bot", endpoint="list"))
    wait_for(lambda: len(hub.requests("acme/bot", endpoint="list")) >= lists + 4, what="reads after the restart")
    assert daemon.terminate() == 0
    (completed,) = [e for e in _events(config) if e["type"] == "fine_tune.status_changed"]
    assert completed["data"]["status"] == "completed" and completed["data"]["latest_step"] == 200
    assert completed["data"]["checkpoints"] == 2
    assert (
        _count(config, "fine_tune.discovered", "ft_new") == 1
        and _count(config, "fine_tune.discovered", "ft_later") == 1
    )
    assert not _count(config, "fine_tune.discovered", "ft_run")
    rows = {row["id"]: row for row in status()}
    assert rows["ft_run"]["hub_status"] == "completed" and rows["ft_later"]["source"] == "support"


async def test_filters_decide_what_a_source_watches(hub: SimHub, tmp_path: Path) -> None:
    old = time.time() - 30 * 86400
    hub.add_fine_tune("acme", "bot", "ft_keep", name="prod-sft", created_by="alice")
    hub.add_fine_tune("acme", "bot", "ft_scratch", name="scratch-1", created_by="alice")
    hub.add_fine_tune("acme", "bot", "ft_dpo", name="prod-dpo", created_by="alice")  # exclude wins
    hub.add_fine_tune("acme", "bot", "ft_other", name="prod-rl", created_by="bob")  # created_by alone
    hub.add_fine_tune("acme", "bot", "ft_aged", name="prod-old", created_by="alice", status="completed",
                      created_at=old, finished_at=old)  # fmt: skip
    source = {
        "name": "support",
        "namespace": "acme",
        "repo": "bot",
        "interval_s": 0.5,
        "include": ["prod-*"],
        "exclude": ["*-dpo"],
        "created_by": "alice",
        "max_age_days": 7,
    }
    path = write_config(tmp_path / "w.toml", config_of(hub, tmp_path, discover=[source]))
    async with running(path) as (app, events):
        await until(lambda: app.lifecycle.baselined("support"), what="the baseline read")
        await until(lambda: set(app.watcher.fine_tunes) == {"acme/bot/ft_keep"}, what="only the matching run")
        hub.add_fine_tune("acme", "bot", "ft_new", name="prod-v2", created_by="alice")
        hub.add_fine_tune("acme", "bot", "ft_new_scratch", name="scratch-2", created_by="alice")
        await until(lambda: of_type(events, "fine_tune.discovered"), what="the new run")
        wanted = {"acme/bot/ft_keep", "acme/bot/ft_new"}
        await until(lambda: set(app.watcher.fine_tunes) == wanted, what="the new run watched")
    assert [e.data["fine_tune"]["id"] for e in of_type(events, "fine_tune.discovered")] == ["ft_new"]


async def test_a_run_created_while_the_list_is_read_is_discovered_by_the_next_read(hub: SimHub, tmp_path: Path) -> None:
    for index in range(150):  # two pages
        hub.add_fine_tune("acme", "bot", f"ft_{index:03d}", created_at=1_700_000_000 + index)
    path = write_config(tmp_path / "w.toml", config_of(hub, tmp_path))
    shifted: list[str] = []

    def shift(repo: str, page: int) -> None:
        if page == 2 and not shifted:  # a run starts between the reads of page 1 and page 2
            shifted.append(hub.add_fine_tune("acme", "bot", "ft_during"))

    async with running(path) as (app, events):
        await until(lambda: app.lifecycle.baselined("support"), what="the baseline read")
        hub.on_list = shift
        (found,) = await until(lambda: of_type(events, "fine_tune.discovered"), what="the run created mid-read")
        assert found.data["fine_tune"]["id"] == "ft_during"
        await until(lambda: len(hub.requests("acme/bot", endpoint="list")) > 10, what="more reads")
        assert len(app.watcher.fine_tunes) == 151
    assert len(of_type(events, "fine_tune.discovered")) == 1


def test_once_reads_sources_and_statuses(hub: SimHub, tmp_path: Path) -> None:
    hub.add_fine_tune("acme", "bot", "ft_run", status="running")
    hub.add_fine_tune("acme", "lab", "ft_listed", status="enqueued")
    listed = {"namespace": "acme", "repo": "lab", "id": "ft_listed"}
    config = write_config(tmp_path / "w.toml", config_of(hub, tmp_path, fine_tunes=[listed]))
    result = cli("once", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["id"]: row for row in map(orjson.loads, cli("status", "-c", str(config), "--json").stdout.split())}
    assert rows["ft_run"]["hub_status"] == "running" and rows["ft_run"]["source"] == "support"
    assert rows["ft_listed"]["hub_status"] == "enqueued" and rows["ft_listed"]["source"] == "config"
    assert hub.requests("acme/lab/ft_listed", endpoint="fine_tune")
