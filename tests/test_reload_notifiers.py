"""Reloads and notifiers: unchanged ones are kept (client, Slack limiter), replaced ones closed once idle,
and 500 reloads through the daemon's reload path leave open files and memory flat."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import write_config
from test_delivery import REF, SECRET, Rig, _config

from watcher.config.load import load_config, resolve_notifier_secrets
from watcher.core.diff import DiffOptions
from watcher.core.models import FineTuneRef, PollFailed, PollSuccess
from watcher.daemon.app import App, resolve_all
from watcher.delivery.notifiers import NotifierSet
from watcher.store import SqliteStore
from watcher.testing.receiver import Answer, Receiver

SECOND_SECRET = "whsec_" + base64.b64encode(b"t" * 32).decode()


def open_fds() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    """Resident memory of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def until(condition: Callable[[], Any], *, timeout: float = 20.0, what: str = "") -> None:
    """Wait (without blocking the loop) until condition() is truthy."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        await asyncio.sleep(0.01)


def _daemon_config(tmp_path: Path, hook: Receiver, slack: Receiver, *, rotated: bool) -> dict[str, Any]:
    # the two configurations differ in the webhook's secrets (a rotation); the Slack notifier never changes
    secrets = [SECRET, SECOND_SECRET] if rotated else SECRET
    return {
        "hub": {"url": "http://127.0.0.1:9", "token": "t"},
        "watch": {"shutdown_grace_s": 5},
        "state": {"path": str(tmp_path / "w.db")},
        "http": {"listen": "127.0.0.1:0"},
        "log": {"level": "warning", "format": "json"},
        "notifiers": [
            {"name": "hook", "type": "webhook", "url": hook.url, "secret": secrets},
            {"name": "team", "type": "slack", "url": slack.url, "events": ["fine_tune.*"]},
        ],
    }


async def _commit(app: App, ref: FineTuneRef, step: int) -> None:
    store = app.watcher.store
    if step == 1:  # the first poll of a fine-tune is a silent baseline
        await app.watcher.in_store(store.apply_poll, ref, PollSuccess((), "b"), options=DiffOptions(), now=time.time())
    checkpoints = tuple({"step": s} for s in range(1, step + 1))
    await app.watcher.in_store(
        store.apply_poll,
        ref,
        PollSuccess(checkpoints, f"h{step}"),
        options=DiffOptions(),
        now=time.time(),
        route=app.dispatcher.route,
    )
    app.dispatcher.wake()


async def test_500_reloads_alternating_two_notifier_configs_leave_fds_and_rss_flat(tmp_path: Path) -> None:
    with Receiver(secret=SECRET) as hook, Receiver() as slack:
        path = write_config(tmp_path / "c.toml", _daemon_config(tmp_path, hook, slack, rotated=False))
        config = load_config(str(path))
        app = App(config, resolve_all(config), config_path=str(path))
        running = asyncio.create_task(app.run())
        committed = 0
        try:
            committed += 1
            await _commit(app, REF, committed)
            await until(lambda: len(hook.deliveries()) == 1, what="the daemon to deliver")
            baseline: tuple[int, float] | None = None
            for n in range(500):
                write_config(path, _daemon_config(tmp_path, hook, slack, rotated=n % 2 == 0))
                assert await app.reload()
                if n % 5 == 0:  # a delivery every few reloads: each webhook client opens a connection
                    expected = committed
                    await until(lambda: len(hook.deliveries()) == expected, what=f"delivery {expected}")
                    committed += 1
                    await _commit(app, REF, committed)
                if n == 49:  # after warm-up (imports, caches, the pools' first connections)
                    baseline = (open_fds(), rss_mb())
            await until(lambda: len(hook.deliveries()) == committed, what="the last delivery")
            assert baseline is not None
            fds, rss = open_fds(), rss_mb()
            print(f"fds {baseline[0]} -> {fds}, RSS {baseline[1]:.1f} -> {rss:.1f} MB over 450 reloads")
            assert fds - baseline[0] <= 6, f"open fds grew from {baseline[0]} to {fds} over 450 reloads"
            assert rss - baseline[1] <= 25, f"RSS grew from {baseline[1]:.0f} to {rss:.0f} MB over 450 reloads"
            # no delivery failed because its client was closed under it: each event went out once, first time
            assert all(r.status == 200 and r.verified for r in hook.deliveries())
            reader = SqliteStore(tmp_path / "w.db", readonly=True)  # the daemon's connection is its store thread's
            ids = [event.id for event in reader.recent_events(limit=1000)]
            await until(lambda: all(d.state == "delivered" for r in reader.deliveries_of(ids).values() for d in r))
            assert {d.attempts for rows in reader.deliveries_of(ids).values() for d in rows} == {1}
            reader.close()
        finally:
            app.stop.set()
            await running


async def test_unchanged_slack_notifier_keeps_its_rate_limit_and_back_off_across_reloads(tmp_path: Path) -> None:
    with Receiver(secret=SECRET) as hook, Receiver() as slack:
        slack.script(Answer(status=429, headers={"Retry-After": "2"}, body="rate_limited"))
        path = write_config(tmp_path / "c.toml", _daemon_config(tmp_path, hook, slack, rotated=False))
        config = load_config(str(path))
        app = App(config, resolve_all(config), config_path=str(path))
        running = asyncio.create_task(app.run())
        refs = [FineTuneRef("acme", "bot", f"ft_{i}", f"ft_{i}") for i in range(4)]
        try:
            store = app.watcher.store
            for ref in refs:  # one event per fine-tune: four lanes, so four messages may go out at once
                event = PollSuccess((), "b")
                await app.watcher.in_store(store.apply_poll, ref, event, options=DiffOptions(), now=time.time())
            for ref in refs:
                for _ in range(3):  # three failed polls: fine_tune.poll_failing, which the Slack notifier wants
                    failed = PollFailed(error="Hub answered 503", http_status=503)
                    await app.watcher.in_store(
                        store.apply_poll,
                        ref,
                        failed,
                        options=DiffOptions(),
                        now=time.time(),
                        route=app.dispatcher.route,
                    )
            app.dispatcher.wake()
            rotated = False
            while sum(r.status == 200 for r in slack.deliveries()) < len(refs):
                rotated = not rotated
                write_config(path, _daemon_config(tmp_path, hook, slack, rotated=rotated))
                assert await app.reload()
                await asyncio.sleep(0.05)  # reloads keep coming while the messages go out
                assert len(slack.deliveries()) <= len(refs) + 1, "a message was sent twice"
            times = [r.at for r in slack.deliveries()]
            assert [r.status for r in slack.deliveries()] == [429, 200, 200, 200, 200]
            assert times[1] - times[0] >= 1.95, "the 429's Retry-After was forgotten by a reload"
            gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
            assert all(gap >= 0.95 for gap in gaps), f"more than one message a second: {gaps}"
        finally:
            app.stop.set()
            await running


async def test_an_unchanged_notifier_is_kept_and_a_replaced_one_closed_after_its_delivery(tmp_path: Path) -> None:
    with Receiver(secret=SECRET) as receiver:
        receiver.script(Answer(status=200, delay_s=1.0))
        hook = {"name": "ci", "type": "webhook", "url": receiver.url, "secret": SECRET}
        log = {"name": "out", "type": "log", "events": ["fine_tune.*"]}
        rig = Rig(tmp_path, hook, log)
        dispatcher = rig.dispatcher
        dispatcher.reconfigure(rig.config, resolve_notifier_secrets(rig.config))
        first = dict(dispatcher.notifiers)
        same = _config(tmp_path, hook, {**log, "events": ["checkpoint.*"]})  # a filter is no setting of the object
        dispatcher.reconfigure(same, resolve_notifier_secrets(same))
        assert dispatcher.notifiers["ci"] is first["ci"] and dispatcher.notifiers["out"] is first["out"]
        ids = rig.commit(REF, 1)
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            await until(lambda: receiver.deliveries(), what="the slow delivery to start")
            rotated = _config(tmp_path, {**hook, "secret": [SECRET, SECOND_SECRET]}, log)
            dispatcher.reconfigure(rotated, resolve_notifier_secrets(rotated))
            replaced = first["ci"]
            assert dispatcher.notifiers["ci"] is not replaced
            assert not replaced._http.is_closed  # its delivery is still in flight
            await until(lambda: ("ci", "delivered") in rig.states(ids)[ids[0]], what="the delivery")
            await until(lambda: replaced._http.is_closed, what="the replaced client to close")
            (row,) = [d for d in rig.store.deliveries_of(ids)[ids[0]] if d.notifier == "ci"]
            assert row.attempts == 1 and row.last_error is None
            assert not dispatcher.notifiers["ci"]._http.is_closed
        finally:
            stop.set()
            await task
        await rig.close()
        assert dispatcher.notifiers["ci"]._http.is_closed


async def test_notifier_set_keeps_unchanged_ones_shares_limiters_by_url_and_closes_the_rest(tmp_path: Path) -> None:
    slack_a = {"name": "a", "type": "slack", "url": "http://127.0.0.1:9/services/T1/B1/x"}
    slack_b = {"name": "b", "type": "slack", "url": "http://127.0.0.1:9/services/T1/B1/x"}
    hook = {"name": "h", "type": "webhook", "url": "http://127.0.0.1:9/h", "secret": SECRET}
    one = _config(tmp_path, slack_a, slack_b, hook)
    notifiers = NotifierSet()
    first = notifiers.update(one, resolve_notifier_secrets(one))
    assert first["a"]._limiter is first["b"]._limiter  # one URL, one rate limit
    two = _config(tmp_path, {**slack_a, "timeout_s": 5}, {**slack_b, "max_age_s": 60})  # "a" changed, "h" removed
    second = notifiers.update(two, resolve_notifier_secrets(two))
    assert second["b"] is first["b"]  # max_age_s is the dispatcher's, not the object's
    assert second["a"] is not first["a"] and second["a"]._limiter is first["a"]._limiter
    await until(lambda: first["a"]._http.is_closed and first["h"]._http.is_closed, what="the replaced to close")
    assert not second["a"]._http.is_closed and not second["b"]._http.is_closed
    await notifiers.aclose()
    assert second["a"]._http.is_closed and second["b"]._http.is_closed


async def test_300_reloads_replacing_the_hub_client_close_each_old_one_once_its_polls_end(
    tmp_path: Path, hub: Any
) -> None:
    # a changed [hub] setting builds a new Hub client at each reload; the old one (with its connection pool)
    # must be closed once the polls still using it end, not kept until exit
    from conftest import base_config

    key = hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(key, 1, loss=1.0)

    def config(n: int) -> dict[str, Any]:
        data = base_config(
            hub,
            tmp_path,
            fine_tunes=[{"namespace": "acme", "repo": "bot", "id": "ft_1"}],
            log={"level": "warning"},
        )
        data["hub"]["timeout_s"] = 5 + n % 2
        return data

    path = write_config(tmp_path / "c.toml", config(0))
    loaded = load_config(str(path))
    app = App(loaded, resolve_all(loaded), config_path=str(path))
    running = asyncio.create_task(app.run())
    try:
        await until(lambda: len(hub.requests()) >= 1, what="the first poll")
        baseline: tuple[int, float] | None = None
        for n in range(1, 301):
            write_config(path, config(n))
            assert await app.reload()
            if n % 10 == 0:  # let polls run on the new client, so each old client had a connection open
                seen = len(hub.requests())
                await until(lambda: len(hub.requests()) > seen, what="a poll on the new client")
            if n == 50:
                baseline = (open_fds(), rss_mb())
        await until(lambda: len(app._retired) <= 1, what="the replaced clients to close")
        assert baseline is not None
        fds, rss = open_fds(), rss_mb()
        print(f"fds {baseline[0]} -> {fds}, RSS {baseline[1]:.1f} -> {rss:.1f} MB over 250 Hub client swaps")
        assert fds - baseline[0] <= 6, f"open fds grew from {baseline[0]} to {fds} over 250 Hub client swaps"
        assert rss - baseline[1] <= 25, f"RSS grew from {baseline[1]:.0f} to {rss:.0f} MB"
    finally:
        app.stop.set()
        await running
