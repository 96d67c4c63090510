"""The poll loop in-process against the simulated Hub: faults, Retry-After hold-backs, crashes, 401 logging."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import structlog
from conftest import TOKEN, base_config
from prometheus_client import CollectorRegistry

from watcher.config.load import parse_config
from watcher.daemon.app import Watcher
from watcher.daemon.scheduling import PollDriver, PollSchedule
from watcher.hub.client import HubClient
from watcher.observe.metrics import Metrics
from watcher.store import SqliteStore
from watcher.testing.simhub import Fault, SimHub

KEY = "acme/bot/ft_1"
FT = {"namespace": "acme", "repo": "bot", "id": "ft_1"}


class Clock:
    """An injected wall clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_watcher(hub: SimHub, tmp_path: Path, clock: Clock, *, token: str = TOKEN, **watch: object) -> Watcher:
    data = base_config(hub, tmp_path, fine_tunes=[FT], watch={"failure_threshold": 2, **watch})
    config = parse_config(data, source="test.toml", directory=tmp_path)
    client = HubClient(base_url=hub.url, token=token, timeout_s=1.0, retry_budget_s=2.0, clock=clock)
    return Watcher(config=config, store=SqliteStore(tmp_path / "w.db"), client=client, clock=clock)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_faults_are_errors_for_one_poll_and_never_remove_checkpoints(hub, tmp_path, clock):
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(KEY, 1, loss=1.0)
    watcher = make_watcher(hub, tmp_path, clock)
    try:
        baseline = await watcher.poll(KEY)
        assert baseline is not None and baseline.answered_200 and baseline.events == ()
        faults = [
            Fault(status=500),
            Fault(status=200, body=b"{not json"),
            Fault(status=200, body=b"<html><body>Bad gateway</body></html>", content_type="text/html"),
            Fault(status=200, body=b'{"checkpoints": "none"}'),
            Fault(status=200, body=b'{"checkpoints": [{"step": "1"}]}'),
            Fault(status=200, body=b'{"status": "success"}'),
            Fault(status=200, body=b'{"checkpoints": [{"step": 1}, {"step": 1}]}'),
            Fault(status=200, body=b'{"checkpoints": []' + b" " * 100, truncate=True, times=10),
            Fault(status=400),
        ]
        events = []
        for fault in faults:
            hub.inject(KEY, fault)
            report = await watcher.poll(KEY)
            assert report is not None and not report.answered_200, fault
            hub.clear_faults(KEY)
            events += [e.type for e in report.events]
        # failure_threshold=2: exactly one poll_failing, no checkpoint event of any kind
        assert events == ["fine_tune.poll_failing"]
        hub.add_checkpoint(KEY, 2, loss=0.5)
        recovered = await watcher.poll(KEY)
        assert recovered is not None
        assert [e.type for e in recovered.events] == ["fine_tune.poll_recovered", "checkpoint.created"]
        assert recovered.events[0].data["consecutive_failures"] == len(faults)
        assert recovered.events[1].data["checkpoint"]["step"] == 2
    finally:
        await watcher.aclose()


async def test_retry_after_beyond_the_budget_holds_the_fine_tune_back_across_restarts(hub, tmp_path, clock):
    hub.add_fine_tune("acme", "bot", "ft_1")
    watcher = make_watcher(hub, tmp_path, clock)
    try:
        hub.inject(KEY, Fault(status=429, retry_after="120"))
        report = await watcher.poll(KEY)
        assert report is not None and report.result is not None
        assert report.result.retry_after_s == 120  # type: ignore[union-attr]
        assert len(hub.requests(KEY)) == 1  # no quick retry: Retry-After is beyond the budget
        clock.now += 60
        assert await watcher.poll(KEY) is None
        assert len(hub.requests(KEY)) == 1
    finally:
        await watcher.aclose()
    restarted = make_watcher(hub, tmp_path, clock)
    try:
        await restarted.load()
        assert await restarted.poll(KEY) is None
        assert len(hub.requests(KEY)) == 1
        clock.now += 61
        report = await restarted.poll(KEY)
        assert report is not None and report.answered_200
        assert len(hub.requests(KEY)) == 2
    finally:
        await restarted.aclose()


async def test_short_retry_after_is_retried_inside_the_poll(hub, tmp_path, clock):
    hub.add_fine_tune("acme", "bot", "ft_1")
    watcher = make_watcher(hub, tmp_path, clock)
    try:
        hub.inject(KEY, Fault(status=503, retry_after="1"))
        report = await watcher.poll(KEY)
        assert report is not None and report.answered_200
        first, second = hub.requests(KEY)
        assert second.at - first.at >= 1.0
    finally:
        await watcher.aclose()


async def test_an_exception_inside_a_poll_does_not_stop_the_next(hub, tmp_path, clock):
    hub.add_fine_tune("acme", "bot", "ft_1")
    watcher = make_watcher(hub, tmp_path, clock)

    def broken_sink(event: object) -> None:
        raise RuntimeError("sink exploded")

    original = watcher.store.apply_poll
    calls = {"n": 0}

    def apply_poll_failing_once(*args: object, **kwargs: object):  # an injected fault at the store boundary
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("unexpected")
        return original(*args, **kwargs)

    watcher.store.apply_poll = apply_poll_failing_once  # type: ignore[method-assign]
    watcher.sinks.append(broken_sink)
    try:
        crashed = await watcher.poll(KEY)
        assert crashed is not None and crashed.error == "internal error: ValueError"
        assert watcher.health[KEY].crashed == 1
        hub.add_checkpoint(KEY, 5, loss=1.0)
        report = await watcher.poll(KEY)
        assert report is not None and report.answered_200
    finally:
        await watcher.aclose()


async def test_unauthorized_is_logged_once_for_the_hub(hub, tmp_path, clock):
    for fine_tune in ("ft_1", "ft_2", "ft_3"):
        hub.add_fine_tune("acme", "bot", fine_tune)
    data = base_config(
        hub, tmp_path, fine_tunes=[{"namespace": "acme", "repo": "bot", "id": f"ft_{i}"} for i in (1, 2, 3)]
    )
    config = parse_config(data, source="t.toml", directory=tmp_path)
    client = HubClient(base_url=hub.url, token="wrong-token", timeout_s=1.0, clock=clock)
    watcher = Watcher(config=config, store=SqliteStore(tmp_path / "w.db"), client=client, clock=clock)
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                reports = await watcher.poll_all()
                assert all(r.result is not None and r.result.outcome == "unauthorized" for r in reports)  # type: ignore[union-attr]
        assert [entry["event"] for entry in logs].count("hub.unauthorized") == 1
        assert "wrong-token" not in repr(logs)
        assert len(hub.requests()) == 9  # 401 is not retried
    finally:
        await watcher.aclose()


async def test_a_gzip_answer_is_decoded_once(hub, tmp_path, clock):
    hub.add_fine_tune("acme", "bot", "ft_1")
    hub.add_checkpoint(KEY, 1, loss=1.0)
    hub.gzip = True
    watcher = make_watcher(hub, tmp_path, clock, baseline=False)
    try:
        report = await watcher.poll(KEY)
        assert report is not None and report.answered_200, report
        assert [e.data["checkpoint"]["step"] for e in report.events] == [1]
    finally:
        await watcher.aclose()


async def test_a_body_that_trickles_in_times_out(hub, tmp_path, clock):
    hub.add_fine_tune("acme", "bot", "ft_1")
    # a byte every 0.25 s (each read well inside the 1 s timeout), the whole body only after 60 s
    body = b'{"checkpoints": []}'.ljust(240)
    hub.inject(KEY, Fault(status=200, body=body, trickle_s=60.0, times=10))
    watcher = make_watcher(hub, tmp_path, clock)  # timeout_s = 1.0, retry budget 2 s
    try:
        started = time.monotonic()
        report = await watcher.poll(KEY)
        assert report is not None and not report.answered_200
        assert report.result.error.startswith("timed out")  # type: ignore[union-attr]
        # about the timeout plus the budget (2 to 3 s); reading (or draining) the body would take 60 s
        assert time.monotonic() - started < 30
    finally:
        await watcher.aclose()


# --- one object per fine-tune: removal while a poll is in flight -------------------------------------------


async def until(condition, *, timeout: float = 20.0, what: str = "") -> None:
    """Wait (on the event loop) until condition() is true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)


def two_fine_tunes(hub: SimHub, tmp_path: Path, *ids: str) -> list[dict[str, str]]:
    for fine_tune in ids:
        hub.add_fine_tune("acme", "bot", fine_tune)
    return [{"namespace": "acme", "repo": "bot", "id": fine_tune} for fine_tune in ids]


def config_of(hub: SimHub, tmp_path: Path, fine_tunes: list[dict[str, str]]):
    data = base_config(hub, tmp_path, fine_tunes=fine_tunes, watch={"failure_threshold": 2})
    return parse_config(data, source="t.toml", directory=tmp_path)


def series(registry: CollectorRegistry, fine_tune_id: str) -> list[str]:
    """Every sample of the registry that names this fine-tune."""
    return [
        f"{sample.name}{sample.labels}"
        for family in registry.collect()
        for sample in family.samples
        if sample.labels.get("fine_tune_id") == fine_tune_id
    ]


async def test_a_fine_tune_removed_while_its_poll_is_in_flight_gets_no_health_or_metrics_back(hub, tmp_path, clock):
    fine_tunes = two_fine_tunes(hub, tmp_path, "ft_1", "ft_2")
    registry = CollectorRegistry()
    metrics = Metrics(registry, version="test")
    client = HubClient(base_url=hub.url, token=TOKEN, timeout_s=5.0, clock=clock)
    watcher = Watcher(
        config=config_of(hub, tmp_path, fine_tunes),
        store=SqliteStore(tmp_path / "w.db"),
        client=client,
        clock=clock,
        metrics=metrics,
    )
    second = "acme/bot/ft_2"
    try:
        await watcher.poll_all()
        assert series(registry, "ft_2"), "a watched fine-tune shows its series"
        assert (
            registry.get_sample_value(
                "oxen_watcher_polls_total",
                {"namespace": "acme", "repo": "bot", "fine_tune_id": "ft_2", "outcome": "error"},
            )
            == 0.0
        ), "every outcome starts at 0"
        hub.add_checkpoint(second, 5, loss=1.0)
        hub.inject(second, Fault(status=500, delay_s=0.5))  # the poll hangs at the Hub for half a second
        requests = len(hub.requests(second))
        in_flight = asyncio.create_task(watcher.poll(second))
        await until(lambda: len(hub.requests(second)) > requests, what="the request at the Hub")
        watcher.set_fine_tunes(config_of(hub, tmp_path, fine_tunes[:1]))  # the reload removes it meanwhile
        assert series(registry, "ft_2") == []
        report = await in_flight
        assert report is not None  # it finished (and may have committed) ...
        assert second not in watcher.health and second not in watcher.fine_tunes  # ... but nothing came back
        assert series(registry, "ft_2") == [], "its metrics came back"
        assert series(registry, "ft_1")
    finally:
        await watcher.aclose()


async def test_a_removed_unauthorized_fine_tune_stops_suppressing_hub_unauthorized(hub, tmp_path, clock):
    fine_tunes = two_fine_tunes(hub, tmp_path, "ft_1", "ft_2")
    client = HubClient(base_url=hub.url, token=TOKEN, timeout_s=5.0, clock=clock)
    watcher = Watcher(
        config=config_of(hub, tmp_path, fine_tunes), store=SqliteStore(tmp_path / "w.db"), client=client, clock=clock
    )
    try:
        with structlog.testing.capture_logs() as logs:
            hub.inject("acme/bot/ft_2", Fault(status=403, times=None))
            await watcher.poll("acme/bot/ft_2")
            watcher.set_fine_tunes(config_of(hub, tmp_path, fine_tunes[:1]))  # the refused one is removed
            hub.inject("acme/bot/ft_1", Fault(status=401, times=None))  # now the token is refused for another
            await watcher.poll("acme/bot/ft_1")
        assert [entry["event"] for entry in logs].count("hub.unauthorized") == 2
    finally:
        await watcher.aclose()


# --- Hub-wide back-off: a 429 storm across many fine-tunes --------------------------------------------------


async def storm(hub: SimHub, tmp_path: Path, *, retry_after: str | None, rounds: int) -> tuple[int, float, list[str]]:
    """40 fine-tunes polled every 0.5 s by the real driver; a token-wide 429 storm until the gate has been
    closed `rounds` times. Returns the Hub requests during the storm, its length, and the hub.* log events."""
    ids = [f"ft_{n}" for n in range(40)]
    fine_tunes = two_fine_tunes(hub, tmp_path, *ids)
    config = config_of(hub, tmp_path, fine_tunes)
    client = HubClient(base_url=hub.url, token=TOKEN, timeout_s=5.0)
    watcher = Watcher(config=config, store=SqliteStore(tmp_path / "w.db"), client=client)
    driver = PollDriver(PollSchedule(), watcher.poll)
    driver.reschedule({ft.key: config.interval_of(ft) for ft in config.fine_tunes}, jitter_s=0)
    running = asyncio.create_task(driver.run())
    try:
        with structlog.testing.capture_logs() as logs:
            await until(lambda: all(h.polls >= 2 for h in watcher.health.values()), what="steady polling")
            before = len(hub.requests())
            started = time.monotonic()
            hub.inject(None, Fault(status=429, retry_after=retry_after, times=None))
            await until(lambda: client.gate.throttles >= rounds, timeout=30, what=f"{rounds} closed rounds")
            during = len(hub.requests()) - before
            elapsed = time.monotonic() - started
            hub.clear_faults()
            await until(lambda: not client.gate.throttled, timeout=30, what="recovery")
            recovered_at = len(hub.requests())
            await until(lambda: len(hub.requests()) > recovered_at + 80, what="polling at full rate again")
        return during, elapsed, [entry["event"] for entry in logs if entry["event"].startswith("hub.")]
    finally:
        running.cancel()
        await watcher.drain(1)
        await watcher.aclose()


async def test_a_429_storm_without_retry_after_backs_off_hub_wide(hub, tmp_path):
    during, elapsed, logged = await storm(hub, tmp_path, retry_after=None, rounds=3)
    plain = 40 * elapsed / 0.5
    # measured: 23 requests in 3.5 s against 279 for plain polling (the old per-fine-tune retries: 1.5x plain)
    assert during <= plain, (during, plain)
    assert during <= 0.5 * plain, "the exponential back-off should cut far below plain polling"
    assert logged == ["hub.throttled", "hub.recovered"]  # one line per state change, not per fine-tune


async def test_a_429_storm_with_retry_after_waits_until_then(hub, tmp_path):
    during, elapsed, logged = await storm(hub, tmp_path, retry_after="1", rounds=3)
    plain = 40 * elapsed / 0.5
    # measured: 8 requests in 2.0 s against 162 for plain polling
    assert during <= 0.25 * plain, (during, plain)
    assert logged == ["hub.throttled", "hub.recovered"]
