"""Delivery: the outbox dispatcher with a real receiver on 127.0.0.1 that verifies Standard Webhooks signatures."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import base_config, cli, wait_for, write_config

from watcher.config.load import parse_config, resolve_notifier_secrets
from watcher.core.diff import DiffOptions
from watcher.core.models import FineTuneRef, PollSuccess
from watcher.delivery.dispatch import Dispatcher, RetryPolicy
from watcher.store import SqliteStore
from watcher.testing.receiver import Answer, Receiver

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 24).decode()
REF = FineTuneRef("acme", "bot", "ft_1", "bot-sft")
OTHER = FineTuneRef("acme", "bot", "ft_2", "ft_2")
FAST = [0, 0.2, 0.2, 0.2, 0.2]


def _config(tmp_path: Path, *notifiers: dict, fine_tunes: list[dict] | None = None):
    data = {
        "hub": {"url": "http://127.0.0.1:9", "token": "t"},
        "state": {"path": str(tmp_path / "w.db")},
        "fine_tunes": fine_tunes or [{"namespace": "acme", "repo": "bot", "id": "ft_1", "name": "bot-sft"}],
        "notifiers": list(notifiers),
    }
    return parse_config(data, source="t.toml", directory=tmp_path)


class Rig:
    """A store, a dispatcher and its notifiers, driven by hand."""

    def __init__(self, tmp_path: Path, *notifiers: dict) -> None:
        self.config = _config(tmp_path, *notifiers)
        self.store = SqliteStore(tmp_path / "w.db")
        self.dispatcher = Dispatcher(store=self.store, notifiers={}, configs=self.config.notifiers)
        self.reconfigure(self.config)
        self.polls = 0

    def reconfigure(self, config) -> None:
        """What a reload does: adopt a config's notifiers (unchanged ones kept)."""
        self.dispatcher.reconfigure(config, resolve_notifier_secrets(config))

    def commit(self, ref: FineTuneRef, *steps: int, now: float | None = None) -> list[str]:
        """Commit a poll where these steps appeared (after a silent baseline) and return the event ids."""
        now = time.time() if now is None else now
        if self.store.load_state(ref.key).baselined is False:
            self.store.apply_poll(ref, PollSuccess((), "empty"), options=DiffOptions(), now=now)
        known = sorted(self.store.load_state(ref.key).checkpoints)
        checkpoints = tuple({"step": s, "metrics": {"loss": 1.0 / s}} for s in sorted({*known, *steps}))
        self.polls += 1
        committed = self.store.apply_poll(
            ref,
            PollSuccess(checkpoints, f"h{self.polls}"),
            options=DiffOptions(),
            now=now,
            route=self.dispatcher.route,
        )
        assert committed is not None
        return [event.id for event in committed.events]

    async def run_until(self, condition, *, timeout: float = 15.0) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(self.dispatcher.run(stop))
        deadline = time.monotonic() + timeout
        try:
            while not condition():
                assert time.monotonic() < deadline, "timed out"
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await task
            await self.dispatcher.drain(5)

    def states(self, event_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
        rows = self.store.deliveries_of(event_ids)
        return {event_id: [(d.notifier, d.state) for d in rows[event_id]] for event_id in event_ids}

    async def close(self) -> None:
        await self.dispatcher.aclose()
        self.store.close()


def webhook(receiver: Receiver, name: str = "ci", **extra: object) -> dict:
    return {"name": name, "type": "webhook", "url": receiver.url, "secret": SECRET, "retry_schedule_s": FAST, **extra}


async def test_delivered_and_verified_with_every_rotation_key(tmp_path):
    with Receiver(secret=SECRET) as receiver, Receiver(secret=OLD_SECRET) as old_receiver:
        rig = Rig(
            tmp_path,
            {**webhook(receiver), "secret": [OLD_SECRET, SECRET]},
            {**webhook(old_receiver, "old"), "secret": [OLD_SECRET, SECRET]},
        )
        ids = rig.commit(REF, 100)
        await rig.run_until(lambda: len(receiver.deliveries()) == 1 and len(old_receiver.deliveries()) == 1)
        for got in (receiver.deliveries()[0], old_receiver.deliveries()[0]):
            assert got.verified and got.status == 200
            assert got.webhook_id == ids[0]
            assert got.headers["content-type"] == "application/json"
            assert len(got.headers["webhook-signature"].split(" ")) == 2
            body = got.json
            assert body["id"] == ids[0] and body["type"] == "checkpoint.created"
            assert body["data"]["checkpoint"]["step"] == 100
            assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
        assert rig.states(ids) == {ids[0]: [("ci", "delivered"), ("old", "delivered")]}
        await rig.close()


async def test_503_three_times_then_200_keeps_the_webhook_id(tmp_path):
    with Receiver(secret=SECRET) as receiver:
        receiver.script(Answer(status=503, times=3))
        rig = Rig(tmp_path, webhook(receiver))
        ids = rig.commit(REF, 100)
        await rig.run_until(lambda: rig.states(ids)[ids[0]] == [("ci", "delivered")])
        got = receiver.deliveries()
        assert [r.status for r in got] == [503, 503, 503, 200]
        assert {r.webhook_id for r in got} == {ids[0]}
        assert all(r.verified for r in got)
        (row,) = rig.store.deliveries_of(ids)[ids[0]]
        assert row.attempts == 4 and row.last_error is None
        await rig.close()


async def test_429_retry_after_is_honoured(tmp_path):
    with Receiver(secret=SECRET) as receiver:
        receiver.script(Answer(status=429, headers={"Retry-After": "2"}))
        rig = Rig(tmp_path, webhook(receiver))
        ids = rig.commit(REF, 100)
        await rig.run_until(lambda: rig.states(ids)[ids[0]] == [("ci", "delivered")])
        first, second = receiver.deliveries()
        assert second.at - first.at >= 2.0
        await rig.close()


async def test_410_disables_the_notifier_and_its_pending_rows_wait(tmp_path):
    with Receiver(secret=SECRET) as receiver, Receiver(secret=SECRET) as healthy:
        receiver.script(Answer(status=410, body="gone"))
        rig = Rig(tmp_path, webhook(receiver, max_concurrency=1), webhook(healthy, "other"))
        first = rig.commit(REF, 100)
        second = rig.commit(OTHER, 5)
        await rig.run_until(lambda: len(healthy.deliveries()) == 2 and "ci" in rig.dispatcher.disabled)
        assert len(receiver.deliveries()) == 1  # nothing more was sent to the gone receiver
        states = rig.states(first + second)
        assert ("ci", "dead") in states[first[0]] and ("ci", "pending") in states[second[0]]
        (dead,) = [d for d in rig.store.deliveries_of(first)[first[0]] if d.notifier == "ci"]
        assert dead.last_error == "HTTP 410: gone"
        # a reload (configure) re-enables it; the waiting row then goes out
        rig.reconfigure(rig.config)
        await rig.run_until(lambda: ("ci", "delivered") in rig.states(second)[second[0]])
        await rig.close()


async def test_other_4xx_and_redirects_are_dead_at_once_and_hold_nothing_back(tmp_path):
    with Receiver(secret=SECRET) as receiver:
        receiver.script(Answer(status=400, body="bad"), Answer(status=302, headers={"Location": "http://x/"}))
        rig = Rig(tmp_path, webhook(receiver))
        ids = rig.commit(REF, 1) + rig.commit(REF, 2) + rig.commit(REF, 3)
        await rig.run_until(lambda: all(s != [("ci", "pending")] for s in rig.states(ids).values()))
        assert [rig.states(ids)[i] for i in ids] == [[("ci", "dead")], [("ci", "dead")], [("ci", "delivered")]]
        assert [r.status for r in receiver.deliveries()] == [400, 302, 200]
        await rig.close()


async def test_order_is_kept_within_a_fine_tune_while_retrying(tmp_path):
    with Receiver(secret=SECRET) as receiver:
        receiver.script(Answer(status=500, times=2))
        rig = Rig(tmp_path, webhook(receiver))
        ids = []
        for step in range(1, 6):
            ids += rig.commit(REF, step)
        await rig.run_until(lambda: sum(r.status == 200 for r in receiver.deliveries()) == 5)
        delivered = [r.webhook_id for r in receiver.deliveries() if r.status == 200]
        assert delivered == ids
        await rig.close()


async def test_filters_route_only_matching_events(tmp_path):
    with Receiver(secret=SECRET) as receiver:
        rig = Rig(
            tmp_path,
            webhook(receiver, events=["fine_tune.*"]),
            webhook(receiver, "ft2", fine_tunes=["acme/*/ft_2"]),
            webhook(receiver, "all"),
        )
        first = rig.commit(REF, 1)
        second = rig.commit(OTHER, 1)
        assert rig.states(first + second) == {
            first[0]: [("all", "pending")],
            second[0]: [("all", "pending"), ("ft2", "pending")],
        }
        await rig.run_until(lambda: len(receiver.deliveries()) == 3)
        await rig.close()


async def test_max_age_turns_a_retrying_row_dead(tmp_path):
    with Receiver(secret=SECRET) as receiver:
        receiver.script(Answer(status=503, times=100))
        rig = Rig(tmp_path, webhook(receiver, max_age_s=0.5))
        ids = rig.commit(REF, 1)
        await rig.run_until(lambda: rig.states(ids)[ids[0]] == [("ci", "dead")])
        (row,) = rig.store.deliveries_of(ids)[ids[0]]
        assert "gave up" in (row.last_error or "") and "503" in (row.last_error or "")
        await rig.close()


def test_retry_policy_schedule_jitter_and_retry_after():
    import random

    policy = RetryPolicy(schedule_s=(0, 5, 30, 120, 600, 1800, 3600), max_age_s=86400)
    rng = random.Random(1)
    delays = [
        policy.next_attempt_at(attempts=n, now=1000, queued_at=1000, retry_after_s=None, rng=rng) - 1000
        for n in range(1, 10)
    ]
    for got, base in zip(delays, [5, 30, 120, 600, 1800, 3600, 3600, 3600, 3600], strict=True):
        assert 0.8 * base <= got <= 1.2 * base
    assert policy.next_attempt_at(attempts=1, now=1000, queued_at=1000, retry_after_s=90, rng=rng) >= 1090
    assert policy.next_attempt_at(attempts=7, now=1000 + 86000, queued_at=1000, retry_after_s=None, rng=rng) is None


async def test_a_hung_notifier_never_delays_another(tmp_path):
    with Receiver(secret=SECRET) as slow, Receiver(secret=SECRET) as fast:
        slow.script(Answer(status=503, times=1000))
        rig = Rig(tmp_path, webhook(slow, "slow", retry_schedule_s=[0, 60]), webhook(fast, "fast"))
        ids = [i for step in range(1, 4) for i in rig.commit(REF, step)]
        await rig.run_until(lambda: len(fast.deliveries()) == 3)
        assert [r.webhook_id for r in fast.deliveries()] == ids
        assert len(slow.deliveries()) == 1  # its retry holds back its own lane only
        await rig.close()


def test_redeliver_dead_and_by_id(tmp_path):
    rig = Rig(tmp_path, {"name": "ci", "type": "webhook", "url": "http://127.0.0.1:9/x"})
    ids = rig.commit(REF, 1)
    rig.store.record_delivery("ci", ids, state="dead", now=time.time(), error="HTTP 400")
    config = write_config(
        tmp_path / "c.toml",
        {
            "hub": {"url": "http://127.0.0.1:9", "token": "t"},
            "state": {"path": str(tmp_path / "w.db")},
            "notifiers": [
                {"name": "ci", "type": "webhook", "url": "http://127.0.0.1:9/x"},
                {"name": "late", "type": "log"},
            ],
        },
    )
    result = cli("redeliver", "-c", str(config), "--dead")
    assert result.returncode == 0 and "queued 1" in result.stdout
    assert rig.states(ids) == {ids[0]: [("ci", "pending")]}
    by_id = cli("redeliver", "-c", str(config), ids[0], "--notifier", "late")
    assert by_id.returncode == 0 and "queued 1" in by_id.stdout
    assert rig.states(ids) == {ids[0]: [("ci", "pending"), ("late", "pending")]}
    assert cli("redeliver", "-c", str(config), "evt_nope").returncode == 1
    assert cli("redeliver", "-c", str(config)).returncode == 2


def test_events_json_shows_delivery_state(tmp_path):
    rig = Rig(tmp_path, {"name": "ci", "type": "webhook", "url": "http://127.0.0.1:9/x"})
    ids = rig.commit(REF, 1)
    rig.store.record_delivery(
        "ci", ids, state="pending", now=time.time(), next_attempt_at=2e9, error="HTTP 503", http_status=503
    )
    config = write_config(
        tmp_path / "c.toml",
        {"hub": {"url": "http://127.0.0.1:9", "token": "t"}, "state": {"path": str(tmp_path / "w.db")}},
    )
    out = cli("events", "-c", str(config), "--json")
    (line,) = out.stdout.splitlines()
    envelope = orjson.loads(line)
    assert envelope["deliveries"] == [
        {"notifier": "ci", "state": "pending", "attempts": 1, "next_attempt_at": 2e9, "last_error": "HTTP 503"}
    ]
    table = cli("events", "-c", str(config))
    assert "ci: pending, 1 attempts" in table.stdout and "HTTP 503" in table.stdout


def test_test_notify_success_and_failure(tmp_path):
    with Receiver(secret=SECRET) as receiver:
        receiver.script(Answer(status=200), Answer(status=500, body="boom"))
        config = write_config(
            tmp_path / "c.toml",
            {
                "hub": {"url": "http://127.0.0.1:9", "token": "t"},
                "fine_tunes": [{"namespace": "acme", "repo": "bot", "id": "ft_1", "name": "bot-sft"}],
                "notifiers": [{"name": "ci", "type": "webhook", "url": receiver.url, "secret": SECRET}],
            },
        )
        ok = cli("test-notify", "-c", str(config))
        assert ok.returncode == 0 and "ci: OK" in ok.stdout
        (got,) = receiver.deliveries()
        assert got.verified
        body = got.json
        assert body["type"] == "watcher.test" and body["data"]["notifier"] == "ci"
        assert body["data"]["fine_tune"] == {"namespace": "acme", "repo": "bot", "id": "ft_1", "name": "bot-sft"}
        failed = cli("test-notify", "-c", str(config), "--notifier", "ci")
        assert failed.returncode == 1 and "ci: FAILED: HTTP 500: boom" in failed.stdout
        assert receiver.url not in failed.stdout + failed.stderr
        assert cli("test-notify", "-c", str(config), "--notifier", "nope").returncode == 2


def test_daemon_delivers_everything_after_the_receiver_comes_back_across_kill_9(hub, tmp_path, daemons):
    hub.add_fine_tune("acme", "bot", "ft_1")
    key = "acme/bot/ft_1"
    receiver = Receiver(secret=SECRET).start()
    port = receiver.port
    receiver.stop()  # down: connection refused until it comes back on the same port
    data = base_config(
        hub,
        tmp_path,
        fine_tunes=[{"namespace": "acme", "repo": "bot", "id": "ft_1"}],
        notifiers=[
            {
                "name": "ci",
                "type": "webhook",
                "url": f"http://127.0.0.1:{port}/hook",
                "secret": SECRET,
                "retry_schedule_s": [0, 0.3, 0.3, 0.5],
            }
        ],
    )
    config = write_config(tmp_path / "c.toml", data)
    daemon = daemons(config)

    def pending_count() -> int:
        out = cli("events", "-c", str(config), "--json", "--limit", "1000").stdout.splitlines()
        return sum(
            1
            for line in out
            for d in orjson.loads(line)["deliveries"]
            if d["state"] == "pending" and d["attempts"] >= 1
        )

    wait_for(lambda: cli("status", "-c", str(config), "--json").stdout.count('"ok"'), what="baseline")
    for step in range(1, 5):
        hub.add_checkpoint(key, step, loss=1.0 / step)
    wait_for(lambda: pending_count() >= 1, what="a failed attempt")
    daemon.kill9()
    for step in range(5, 8):
        hub.add_checkpoint(key, step, loss=1.0 / step)
    with Receiver(secret=SECRET, port=port) as back:
        daemon = daemons(config)
        wait_for(
            lambda: len({r.webhook_id for r in back.deliveries() if r.status == 200}) == 7,
            timeout=30,
            what="all seven delivered",
        )
        assert daemon.terminate() == 0
        got = [r for r in back.deliveries() if r.status == 200]
        assert all(r.verified for r in got)
        steps = [r.json["data"]["checkpoint"]["step"] for r in got]
        assert sorted(set(steps)) == list(range(1, 8))
        first_seen = list(dict.fromkeys(steps))
        assert first_seen == sorted(first_seen)  # in order within the fine-tune


@pytest.mark.parametrize("status", [200, 503])
def test_once_runs_one_delivery_pass(hub, tmp_path, status):
    hub.add_fine_tune("acme", "bot", "ft_1")
    with Receiver(secret=SECRET) as receiver:
        receiver.script(Answer(status=status, times=10))
        data = base_config(
            hub,
            tmp_path,
            fine_tunes=[{"namespace": "acme", "repo": "bot", "id": "ft_1"}],
            watch={"baseline": False},
            notifiers=[{"name": "ci", "type": "webhook", "url": receiver.url, "secret": SECRET}],
        )
        hub.add_checkpoint("acme/bot/ft_1", 1, loss=1.0)
        config = write_config(tmp_path / "c.toml", data)
        assert cli("once", "-c", str(config)).returncode == 0
        assert [r.status for r in receiver.deliveries()] == [status]
        (line,) = cli("events", "-c", str(config), "--json").stdout.splitlines()
        (delivery,) = orjson.loads(line)["deliveries"]
        assert delivery["state"] == ("delivered" if status == 200 else "pending")


def test_webhook_does_not_follow_redirects():
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(301, headers={"Location": "http://elsewhere.invalid/"})

    from watcher.core.models import Event
    from watcher.delivery.notifiers.webhook import WebhookNotifier

    async def go():
        notifier = WebhookNotifier(
            name="x", url="http://r.invalid/h", keys=[b"k" * 32], transport=httpx.MockTransport(handler)
        )
        result = await notifier.send([Event("evt_1", "checkpoint.created", "2026-01-01T00:00:00.000Z", {})])
        await notifier.aclose()
        return result

    result = asyncio.run(go())
    assert result.outcome == "dead" and len(requests) == 1


def test_sigterm_lets_an_in_flight_delivery_finish_and_records_it(hub, tmp_path, daemons):
    hub.add_fine_tune("acme", "bot", "ft_1")
    with Receiver(secret=SECRET) as receiver:
        receiver.script(Answer(status=200, delay_s=2.0))
        data = base_config(
            hub,
            tmp_path,
            fine_tunes=[{"namespace": "acme", "repo": "bot", "id": "ft_1"}],
            watch={"shutdown_grace_s": 10},
            notifiers=[{"name": "ci", "type": "webhook", "url": receiver.url, "secret": SECRET}],
        )
        config = write_config(tmp_path / "c.toml", data)
        daemon = daemons(config)
        wait_for(lambda: cli("status", "-c", str(config), "--json").stdout.count('"ok"'), what="baseline")
        hub.add_checkpoint("acme/bot/ft_1", 1, loss=1.0)
        wait_for(lambda: receiver.deliveries(), what="the delivery to start")
        assert daemon.terminate() == 0
        (line,) = cli("events", "-c", str(config), "--json").stdout.splitlines()
        assert orjson.loads(line)["deliveries"][0]["state"] == "delivered"


async def test_reload_retires_a_removed_notifiers_rows_and_a_returning_one_gets_new_events_only(tmp_path):
    with Receiver(secret=SECRET) as a_receiver, Receiver(secret=SECRET) as b_receiver:
        rig = Rig(tmp_path, webhook(a_receiver, "a"))
        a_config = rig.config
        b_config = _config(tmp_path, webhook(b_receiver, "b"))
        both_config = _config(tmp_path, webhook(a_receiver, "a"), webhook(b_receiver, "b"))
        rig.reconfigure(b_config)  # "a" removed before its event went out
        old = rig.commit(REF, 1)
        assert rig.states(old) == {old[0]: [("b", "pending")]}  # routed by the config in force
        rig.reconfigure(a_config)
        first = rig.commit(REF, 2)
        rig.reconfigure(b_config)
        await rig.run_until(lambda: len(b_receiver.deliveries()) == 1 and rig.states(first)[first[0]][0][1] == "dead")
        assert a_receiver.deliveries() == []  # removed: its row is dead, never sent
        (dead,) = rig.store.deliveries_of(first)[first[0]]
        assert (dead.notifier, dead.last_error, dead.attempts) == ("a", "notifier_removed", 0)
        rig.reconfigure(both_config)  # "a" comes back with new events only (no flood of stale ones)
        second = rig.commit(REF, 3)
        await rig.run_until(lambda: len(a_receiver.deliveries()) == 1 and len(b_receiver.deliveries()) == 2)
        assert [r.webhook_id for r in a_receiver.deliveries()] == [second[0]]
        assert [r.webhook_id for r in b_receiver.deliveries()] == [old[0], second[0]]
        await rig.close()


async def test_pending_rows_of_removed_notifiers_are_dead_at_start_and_on_reload(tmp_path):
    with Receiver(secret=SECRET) as receiver:
        gone, ci = webhook(receiver, "gone"), webhook(receiver, "ci")
        late = webhook(receiver, "late", retry_schedule_s=[3600, 1])  # its first attempt waits an hour
        before = Rig(tmp_path, gone, late, ci)
        ids = before.commit(REF, 1)
        await before.close()
        rig = Rig(tmp_path, late, ci)  # a restart without "gone"
        stop = asyncio.Event()
        task = asyncio.create_task(rig.dispatcher.run(stop))
        try:
            expected = [("ci", "delivered"), ("gone", "dead"), ("late", "pending")]
            await _until(lambda: rig.states(ids)[ids[0]] == expected, what="gone retired at start")
            rig.reconfigure(_config(tmp_path, ci))  # a reload without "late", while the loop runs
            expected = [("ci", "delivered"), ("gone", "dead"), ("late", "dead")]
            await _until(lambda: rig.states(ids)[ids[0]] == expected, what="late retired on reload")
        finally:
            stop.set()
            await task
        rows = {d.notifier: d for d in rig.store.deliveries_of(ids)[ids[0]]}
        assert rows["gone"].last_error == rows["late"].last_error == "notifier_removed"
        assert rows["gone"].attempts == rows["late"].attempts == 0
        assert [r.webhook_id for r in receiver.deliveries()] == ids  # only "ci" was sent anything
        await rig.close()


async def test_a_row_queued_longer_ago_than_max_age_is_dead_without_being_sent(tmp_path):
    with Receiver(secret=SECRET) as receiver:
        rig = Rig(tmp_path, webhook(receiver, max_age_s=60))
        stale = rig.commit(REF, 1, now=time.time() - 120)  # queued two minutes ago, while the daemon was down
        fresh = rig.commit(REF, 2)
        await rig.run_until(lambda: rig.states(fresh)[fresh[0]] == [("ci", "delivered")])
        assert [r.webhook_id for r in receiver.deliveries()] == fresh
        (row,) = rig.store.deliveries_of(stale)[stale[0]]
        assert row.state == "dead" and "max_age_s" in (row.last_error or "")
        await rig.close()


async def test_the_first_attempt_waits_retry_schedule_s_0(tmp_path):
    with Receiver(secret=SECRET) as receiver:
        rig = Rig(tmp_path, webhook(receiver, retry_schedule_s=[1.5, 0.2]))
        queries = 0
        due = rig.store.due_deliveries

        def counting(*args, **kwargs):
            nonlocal queries
            queries += 1
            return due(*args, **kwargs)

        rig.store.due_deliveries = counting
        ids = rig.commit(REF, 1)
        await rig.run_until(lambda: receiver.deliveries())
        (row,) = rig.store.deliveries_of(ids)[ids[0]]
        (got,) = receiver.deliveries()
        assert got.at - row.queued_at >= 1.5  # not at once: retry_schedule_s[0] later
        assert queries <= 10, f"{queries} outbox queries while the first attempt waited"  # no busy loop
        await rig.close()


async def _until(condition, *, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_once_from_cron_retries_what_an_earlier_run_left_pending(hub, tmp_path):
    hub.add_fine_tune("acme", "bot", "ft_1")
    with Receiver(secret=SECRET) as receiver:
        receiver.script(Answer(status=503))
        data = base_config(
            hub,
            tmp_path,
            fine_tunes=[{"namespace": "acme", "repo": "bot", "id": "ft_1"}],
            watch={"baseline": False},
            notifiers=[
                {"name": "ci", "type": "webhook", "url": receiver.url, "secret": SECRET, "retry_schedule_s": [0, 0.1]}
            ],
        )
        config = write_config(tmp_path / "c.toml", data)
        hub.add_checkpoint("acme/bot/ft_1", 1, loss=1.0)
        assert cli("once", "-c", str(config)).returncode == 0
        hub.add_checkpoint("acme/bot/ft_1", 2, loss=0.5)
        assert cli("once", "-c", str(config)).returncode == 0
        steps = [r.json["data"]["checkpoint"]["step"] for r in receiver.deliveries() if r.status == 200]
        assert steps == [1, 2]  # the first run's failed delivery went out first, then the second's


def test_once_beside_run_leaves_delivery_to_the_daemon(hub, tmp_path, daemons):
    hub.add_fine_tune("acme", "bot", "ft_1")
    with Receiver(secret=SECRET) as receiver:
        data = base_config(
            hub,
            tmp_path,
            fine_tunes=[{"namespace": "acme", "repo": "bot", "id": "ft_1"}],
            watch={"interval_s": 30},
            notifiers=[{"name": "ci", "type": "webhook", "url": receiver.url, "secret": SECRET}],
        )
        config = write_config(tmp_path / "c.toml", data)
        assert cli("once", "-c", str(config)).returncode == 0  # the baseline
        daemon = daemons(config)
        wait_for(lambda: any(e.get("event") == "watcher.started" for e in daemon.logs()), what="daemon up")
        hub.add_checkpoint("acme/bot/ft_1", 1, loss=1.0)
        result = cli("once", "-c", str(config))
        assert result.returncode == 0 and "delivery.left_to_daemon" in result.stderr
        wait_for(lambda: receiver.deliveries(), what="the daemon to deliver")
        assert daemon.terminate() == 0
        assert len(receiver.deliveries()) == 1
