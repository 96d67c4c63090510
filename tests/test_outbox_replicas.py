"""The outbox among replicas on PostgreSQL: redeliver against a concurrent prune, lanes nobody owns, `once` and the
fair share, fenced delivery."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Collection, Sequence
from typing import Any

import psycopg
import pytest
from conftest import wait_for
from store_contract.support import apply, cp, success

from watcher.config.load import parse_config
from watcher.core.models import Event, FineTuneRef
from watcher.daemon.replicas.keeper import LeaseKeeper
from watcher.delivery.dispatch import Dispatcher
from watcher.delivery.notifiers.base import DeliveryResult
from watcher.errors import StoreError
from watcher.store.postgres.store import PostgresStore


def _waiting_on_a_lock(url: str, pid: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "Lock"


@pytest.mark.parametrize("dead", [False, True])
def test_redeliver_locks_the_event_so_a_concurrent_prune_never_leaves_a_row_without_its_event(
    pg_url: str, dead: bool
) -> None:
    store = PostgresStore(pg_url, pool_min=1, pool_max=1)  # one connection: its backend pid is the redeliver's
    try:
        now = time.time()
        apply(store, success(cp(1)), now=now)
        event = apply(store, success(cp(1), cp(2)), now=now, route=lambda _e: ["hook"]).events[0]
        store.record_delivery("hook", [event.id], state="dead", now=now, error="x")
        with store.pool.connection() as conn:
            pid = conn.info.backend_pid
        done = threading.Event()
        failures: list[BaseException] = []

        def redeliver() -> None:
            try:
                if dead:
                    store.redeliver(now=now + 1, dead=True)
                else:
                    store.redeliver(now=now + 1, event_ids=[event.id], route=lambda _e: ["hook"])
            except StoreError as err:
                failures.append(err)
            finally:
                done.set()

        # what a prune batch does: the event locked (FOR UPDATE), then deleted with its finished rows
        with psycopg.connect(pg_url, autocommit=True) as prune, prune.transaction():
            prune.execute("SELECT 1 FROM events WHERE id = %s FOR UPDATE", (event.id,))
            worker = threading.Thread(target=redeliver)
            worker.start()
            wait_for(lambda: done.is_set() or _waiting_on_a_lock(pg_url, pid), what="redeliver ran or waits")
            prune.execute("DELETE FROM deliveries WHERE event_id = %s AND state != 'pending'", (event.id,))
            prune.execute("DELETE FROM events WHERE id = %s", (event.id,))
        worker.join(20)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            orphans = conn.execute(
                "SELECT count(*) FROM deliveries d WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = d.event_id)"
            ).fetchone()
        assert orphans == (0,)
        if not dead:  # the named event is gone by the time redeliver reads it
            assert failures and "no event with id" in str(failures[0])
    finally:
        store.close()


KEYS = [f"acme/bot/ft_{n}" for n in range(4)]


def replica_config(pg_url: str, *, keys: Sequence[str] = KEYS, **state: Any) -> Any:
    ids = [key.split("/")[2] for key in keys]
    data = {
        "hub": {"url": "http://127.0.0.1:9", "token": "t"},
        "state": {"url": pg_url, "lease_s": 15, **state},
        "fine_tunes": [{"namespace": "acme", "repo": "bot", "id": ft_id} for ft_id in ids],
        "notifiers": [{"name": "hook", "type": "log", "retry_schedule_s": [0, 0.2]}],
    }
    return parse_config(data, source="t.toml")


def configs() -> Any:
    return replica_config("postgresql://unused").notifiers


def test_once_claims_only_free_leases_and_never_counts_toward_the_fair_share(pg_url: str) -> None:
    from watcher.daemon.replicas.wiring import claim_for_once

    store = PostgresStore(pg_url)
    try:
        daemon = store.leases(replica="a", lease_s=15)
        assert len(daemon.claim(KEYS[:3]).acquired) == 3  # a lone daemon: its fair share is all of them
        claim = claim_for_once(store, replica_config(pg_url))
        assert claim is not None and claim.lanes() == [KEYS[3]]  # the free one only
        assert daemon.live() == 1  # `once` is not a replica among which leases are shared
        assert daemon.release_excess(KEYS) == []  # so the daemon gives nothing up while it runs
        assert daemon.claim(KEYS).share == 4
        claim.leave()
        assert daemon.live() == 1
    finally:
        store.close()


class Collecting:
    """A notifier that records what it is sent and says delivered; a Paced one waits for `turn` first (the test
    holds a sender there: a process frozen between reading a lane's head and sending it)."""

    digest_over: int | None = None

    def __init__(self, name: str = "hook") -> None:
        self.name = name
        self.sent: list[str] = []
        self.turn: asyncio.Event | None = None
        self.waiting = asyncio.Event()

    async def send(self, events: Sequence[Event]) -> DeliveryResult:
        self.sent += [event.id for event in events]
        return DeliveryResult("delivered", http_status=200)

    async def aclose(self) -> None:
        pass


class Held(Collecting):
    """Paced: `wait_turn` blocks until the test sets `turn`."""

    def __init__(self) -> None:
        super().__init__()
        self.turn = asyncio.Event()

    async def wait_turn(self) -> None:
        self.waiting.set()
        assert self.turn is not None
        await self.turn.wait()

    async def send_now(self, events: Sequence[Event]) -> DeliveryResult:
        return await self.send(events)


class Wants:
    """A LeaseListener wanting these fine-tunes, and nothing else."""

    def __init__(self, *keys: str) -> None:
        self.keys = keys

    def wanted(self) -> Collection[str]:
        return self.keys

    def source_keys(self) -> Collection[str]:
        return ()

    def lost(self, keys: Collection[str]) -> None:
        pass

    def sources_changed(self, acquired: Collection[str], lost: Collection[str]) -> None:
        pass

    async def acquired(self, keys: Collection[str]) -> None:
        pass

    async def after_round(self) -> None:
        pass


def keeper_of(store: PostgresStore, name: str, *keys: str) -> LeaseKeeper:
    keeper = LeaseKeeper(store.leases(replica=name, lease_s=15), lease_s=15, renew_s=5)
    keeper.attach(Wants(*keys))
    return keeper


def ref(n: int) -> FineTuneRef:
    return FineTuneRef("acme", "bot", f"ft_{n}", f"ft_{n}")


def announce(store: PostgresStore, target: FineTuneRef, *, polls: int, now: float) -> list[str]:
    """A baseline, then one event per poll for the fine-tune, each routed to `hook`."""
    apply(store, success(cp(1)), ref=target, now=now)
    ids = []
    for n in range(2, polls + 2):
        committed = apply(store, success(*(cp(s) for s in range(1, n + 1))), ref=target, now=now + n, route=hook)
        ids += [event.id for event in committed.events]
    return ids


def hook(_event: Event) -> list[str]:
    return ["hook"]


async def test_lanes_of_fine_tunes_nobody_leases_are_delivered_by_exactly_one_replica(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        now = time.time() - 60
        listed, gone = ref(0), ref(9)  # `gone`: removed from every config, its rows still pending
        listed_ids = announce(store, listed, polls=1, now=now)
        gone_ids = announce(store, gone, polls=2, now=now)
        keepers = [keeper_of(store, name, listed.key) for name in ("b", "a")]
        for _ in range(2):  # the second round sees both replicas live
            for keeper in keepers:
                await keeper.step()
        notifiers = {keeper.replica: Collecting() for keeper in keepers}
        for keeper in keepers:
            dispatcher = Dispatcher(
                store=store, notifiers={"hook": notifiers[keeper.replica]}, configs=configs(), lanes=keeper
            )
            await dispatcher.deliver_due(deadline_s=10)
        owner = next(keeper.replica for keeper in keepers if keeper.owns(listed.key))
        assert set(listed_ids) <= set(notifiers[owner].sent)
        sent = [event_id for notifier in notifiers.values() for event_id in notifier.sent]
        assert sorted(sent) == sorted([*listed_ids, *gone_ids])  # each once
        assert notifiers["a"].sent[-len(gone_ids) :] == gone_ids  # by the first live replica by name, in order
        rows = store.deliveries_of(gone_ids)
        assert {d.state for found in rows.values() for d in found} == {"delivered"}
    finally:
        store.close()


async def test_a_sender_frozen_past_its_lease_never_sends_after_the_new_owner_moved_the_lane_on(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        target = ref(1)
        first, second = announce(store, target, polls=2, now=time.time() - 60)
        frozen = keeper_of(store, "a", target.key)
        await frozen.step()
        assert frozen.fence(target.key) == ("a", 1)
        clock = [1000.0]
        held = Held()
        dispatcher = Dispatcher(
            store=store, notifiers={"hook": held}, configs=configs(), lanes=frozen, monotonic=lambda: clock[0]
        )
        assert await dispatcher.pass_once() == 1  # the head (`first`) read and checked; then the process stops
        await held.waiting.wait()
        # frozen past its lease: it expires, and another replica takes the fine-tune over and delivers its lane
        with store.pool.connection() as conn:
            conn.execute("UPDATE leases SET expires_at = now() - interval '1 second' WHERE owner = 'a'")
        other = keeper_of(store, "b", target.key)
        await other.step()
        assert other.fence(target.key) == ("b", 2)
        moved_on = Collecting()
        await Dispatcher(store=store, notifiers={"hook": moved_on}, configs=configs(), lanes=other).deliver_due(
            deadline_s=10
        )
        assert moved_on.sent == [first, second]
        clock[0] += 40  # the frozen process resumes, 40 s later by its own clock
        assert held.turn is not None
        held.turn.set()
        await dispatcher.drain(10)
        assert held.sent == []  # never `first` again after `second`
    finally:
        store.close()


async def test_a_sender_that_waited_long_for_its_turn_asks_again_and_sends_while_its_lease_holds(
    pg_url: str,
) -> None:
    store = PostgresStore(pg_url)
    try:
        target = ref(1)
        (first,) = announce(store, target, polls=1, now=time.time() - 60)
        keeper = keeper_of(store, "a", target.key)
        await keeper.step()
        clock = [1000.0]
        held = Held()
        dispatcher = Dispatcher(
            store=store, notifiers={"hook": held}, configs=configs(), lanes=keeper, monotonic=lambda: clock[0]
        )
        assert await dispatcher.pass_once() == 1
        await held.waiting.wait()
        clock[0] += 40  # a long wait for a rate-limit slot; the lease was renewed meanwhile: still this lane's owner
        await keeper.step()
        assert held.turn is not None
        held.turn.set()
        await dispatcher.drain(10)
        assert held.sent == [first]
    finally:
        store.close()


def test_deliverable_holds_only_under_the_lease_at_the_lanes_current_position(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        target = ref(1)
        announce(store, target, polls=2, now=time.time() - 60)
        a, b = store.leases(replica="a", lease_s=15), store.leases(replica="b", lease_s=15)
        (head,) = store.due_deliveries(["hook"], now=time.time())
        # nobody leases it: the first live replica by name may send it, and only that one
        a.heartbeat()
        b.heartbeat()
        assert 14 < (store.deliverable(head, replica="a", epoch=None) or 0) <= 15
        assert store.deliverable(head, replica="b", epoch=None) is None
        (lease,) = b.claim([target.key], up_to=1).acquired
        assert store.deliverable(head, replica="a", epoch=None) is None  # leased now: its owner's alone
        assert store.deliverable(head, replica="b", epoch=lease.epoch) is not None
        assert store.deliverable(head, replica="b", epoch=lease.epoch - 1) is None
        assert store.deliverable(head, replica="a", epoch=lease.epoch) is None
        store.record_delivery("hook", [head.event_id], state="pending", now=time.time(), next_attempt_at=0.0)
        assert store.deliverable(head, replica="b", epoch=lease.epoch) is None  # attempted since it was read
        store.record_delivery("hook", [head.event_id], state="delivered", now=time.time())
        assert store.deliverable(head, replica="b", epoch=lease.epoch) is None  # the lane moved on
    finally:
        store.close()


async def test_once_renews_its_claim_before_it_delivers_under_it(pg_url: str) -> None:
    from watcher.daemon.replicas.wiring import claim_for_once

    store = PostgresStore(pg_url)
    try:
        target = ref(1)
        (first,) = announce(store, target, polls=1, now=time.time() - 60)
        claim = claim_for_once(store, replica_config(pg_url, keys=[target.key], lease_s=1, renew_s=0.4))
        assert claim is not None and claim.lanes() == [target.key]
        (head,) = store.due_deliveries(["hook"], now=time.time())
        fence = claim.fence(target.key)
        assert fence is not None
        # polling outlasted the claim's lease
        wait_for(lambda: store.deliverable(head, replica=claim.replica, epoch=fence[1]) is None, what="expiry")
        await asyncio.to_thread(claim.renew)  # what `once` does before delivering
        notifier = Collecting()
        await Dispatcher(store=store, notifiers={"hook": notifier}, configs=configs(), lanes=claim).deliver_due(
            deadline_s=10
        )
        assert notifier.sent == [first]
        assert store.leases(replica="a", lease_s=15).live() == 0  # renewing did not make it a live replica
    finally:
        store.close()
