"""PostgresStore on a throwaway PostgreSQL cluster, beyond the shared contract (tests/store_contract runs on it
too): replicas migrating at once, errors without the URL, a fine-tune taken back with a stale cache, events
committed out of sequence order never missed, the outbox per owned fine-tune, the pool, the real dispatcher, and
a database outage."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import wait_for
from store_contract.support import (
    OPTIONS,
    OTHER,
    REF,
    T0,
    apply,
    counter_ids,
    cp,
    success,
    types,
)

from watcher.core.models import (
    CHECKPOINT_CREATED,
    CHECKPOINT_REMOVED,
    PollNotFound,
)
from watcher.errors import StoreError
from watcher.store.postgres.schema import SCHEMA_VERSION
from watcher.store.postgres.store import PostgresStore


@pytest.fixture
def stores(pg_url: str) -> Iterator[Callable[..., PostgresStore]]:
    """A factory of stores on this test's database, closed at the end of the test."""
    opened: list[PostgresStore] = []

    def make(**kwargs: Any) -> PostgresStore:
        store = PostgresStore(pg_url, **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(stores: Callable[..., PostgresStore]) -> PostgresStore:
    return stores(new_id=counter_ids())


# --- schema ---------------------------------------------------------------------------------------


def test_replicas_starting_together_migrate_once(pg_url: str, stores: Callable[..., PostgresStore]) -> None:
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            stores()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_an_unreachable_database_is_a_store_error_without_the_url(tmp_path: Any) -> None:
    url = f"postgresql://watcher:s3cret-pw-value@/nowhere?host={tmp_path}&port=5999"
    with pytest.raises(StoreError) as caught:
        PostgresStore(url, connect_timeout_s=1)
    message = str(caught.value)
    assert "unreachable" in message
    assert "s3cret-pw-value" not in message and str(tmp_path) not in message and "5999" not in message


def test_a_server_error_is_wrapped_with_a_safe_message(pg_url: str, stores: Callable[..., PostgresStore]) -> None:
    ids = iter(["evt_same", "evt_same"])
    store = stores(new_id=lambda: next(ids))
    apply(store, success(cp(1)))
    apply(store, success(cp(1), cp(2)), now=T0 + 1)
    with pytest.raises(StoreError) as caught:
        store.apply_poll(REF, success(cp(1), cp(2), cp(3)), options=OPTIONS, now=T0 + 2)
    assert "SQLSTATE 23505" in str(caught.value) and pg_url not in str(caught.value)


# --- apply_poll -------------------------------------------------------------------------------------


def test_a_store_that_takes_a_fine_tune_back_with_a_stale_cache_announces_each_change_once(
    stores: Callable[..., PostgresStore],
) -> None:
    # a baselines the fine-tune; b takes it over and moves it on; a gets it back still caching the baseline
    a, b = stores(new_id=counter_ids("evt_a")), stores(new_id=counter_ids("evt_b"))
    apply(a, success(cp(1)))
    assert types(apply(b, success(cp(1), cp(2)), now=T0 + 1)) == [CHECKPOINT_CREATED]
    assert a.body_hash(REF.key) == success(cp(1)).body_hash  # stale: the body b has committed since differs
    # the body b committed is no news for a (its state is read afresh inside the transaction) ...
    assert types(apply(a, success(cp(1), cp(2)), now=T0 + 2)) == []
    # ... the next change is
    assert types(apply(a, success(cp(1), cp(2), cp(3)), now=T0 + 3)) == [CHECKPOINT_CREATED]
    # b's cache is stale now, on a body that came back to the one it last saw: its unchanged fast path only
    # batches a poll time, which is refused (the state moved on), and its next poll diffs for real
    assert types(apply(a, success(cp(1), cp(2)), now=T0 + 4)) == [CHECKPOINT_REMOVED]
    assert b.observe_unchanged(REF.key, success(cp(1), cp(2)).body_hash, now=T0 + 5) is not None
    assert b.flush_touches() == [REF.key]
    assert b.body_hash(REF.key) is None
    assert types(apply(b, success(cp(1), cp(2)), now=T0 + 6)) == []
    created = [event.data["checkpoint"]["step"] for event in a.recent_events() if event.type == CHECKPOINT_CREATED]
    assert sorted(created) == [2, 3]


# --- reports ----------------------------------------------------------------------------------------


def test_recent_events_pages_through_many_events(store: PostgresStore) -> None:
    apply(store, success(cp(1)))
    steps = list(range(1, 1202))
    apply(store, success(*(cp(s) for s in steps)), now=T0 + 1)  # 1200 created in one poll
    apply(store, PollNotFound(), ref=OTHER, now=T0 + 2)
    assert len(store.recent_events(limit=5000)) == 1201
    [oldest_created] = store.recent_events(limit=1, type_glob="fine_tune.*")
    assert oldest_created.fine_tune_key == OTHER.key
    assert [e.data["checkpoint"]["step"] for e in store.recent_events(limit=1201, type_glob="checkpoint.*")][-1] == 2


def test_events_committed_out_of_order_are_never_missed_after_a_cursor(
    pg_url: str, store: PostgresStore, stores: Callable[..., PostgresStore]
) -> None:
    """An older transaction that commits after a younger one: a reader that already read past the younger one's
    events must still get the older one's."""
    apply(store, success(cp(1)))
    apply(store, success(cp(1)), ref=OTHER)
    cursor = 0
    seen: list[str] = []

    def read() -> None:
        nonlocal cursor
        for seq, event in store.events_after(cursor):
            assert seq > cursor
            cursor = seq
            seen.append(event.id)

    # the older transaction: holds a transaction id, then writes an event, and stays open
    older = psycopg.connect(pg_url)
    older.execute("SELECT pg_current_xact_id()")
    # the younger one commits an event through the store while the older one is open
    younger = apply(stores(new_id=counter_ids("evt_young")), success(cp(1), cp(2)), ref=OTHER, now=T0 + 1)
    read()
    assert seen == []  # held back: an older transaction is still in progress
    older.execute(
        "INSERT INTO events (seq, xid, id, type, fine_tune_key, created_at, envelope) "
        "SELECT (pg_current_xact_id()::text::bigint << 20), pg_current_xact_id(), 'evt_old', %s, %s, 0, %s",
        (CHECKPOINT_CREATED, REF.key, '{"id": "evt_old", "type": "checkpoint.created", "timestamp": "t", "data": {}}'),
    )
    older.commit()
    older.close()
    read()
    assert seen == ["evt_old", younger.events[0].id]  # both, in sequence order
    later = apply(store, success(cp(1), cp(2)), now=T0 + 2)
    read()
    assert seen[2:] == [later.events[0].id]


# --- the outbox -------------------------------------------------------------------------------------


def route_to(*names: str) -> Callable[[Any], list[str]]:
    return lambda event: list(names)


def test_outbox_lanes_batches_outcomes_and_redelivery(store: PostgresStore) -> None:
    apply(store, success(cp(1)))
    apply(store, success(cp(1)), ref=OTHER)
    first = apply(store, success(cp(1), cp(2), cp(3)), now=T0 + 1, route=route_to("ci", "slack"))
    second = apply(store, success(cp(1), cp(2), cp(3), cp(4)), now=T0 + 2, route=route_to("ci"))
    other = apply(store, success(cp(1), cp(2)), ref=OTHER, now=T0 + 3, route=route_to("ci"))
    heads = store.due_deliveries(["ci"], now=T0 + 10)
    assert sorted((d.fine_tune_key, d.event_id) for d in heads) == sorted(
        [(REF.key, first.events[0].id), (OTHER.key, other.events[0].id)]
    )
    assert store.due_deliveries(["ci"], now=T0) == []  # nothing due yet
    # a replica delivers only the lanes of the fine-tunes it owns
    assert [d.fine_tune_key for d in store.due_deliveries(["ci"], now=T0 + 10, fine_tunes=[OTHER.key])] == [OTHER.key]
    assert store.due_deliveries(["ci"], now=T0 + 10, fine_tunes=[]) == []
    assert store.next_due_at(["ci"], fine_tunes=[OTHER.key]) == T0 + 3
    assert store.next_due_at(["ci"], fine_tunes=[]) is None
    assert store.next_due_at(["ci", "slack"]) == T0 + 1 and store.next_due_at([]) is None
    head = next(d for d in heads if d.fine_tune_key == REF.key)
    assert [d.event_id for d in store.lane_batch(head)] == [e.id for e in first.events]
    ids = [e.id for e in first.events]
    store.record_delivery("ci", ids, state="delivered", now=T0 + 11, http_status=200)
    [next_head] = [d for d in store.due_deliveries(["ci"], now=T0 + 20) if d.fine_tune_key == REF.key]
    assert next_head.event_id == second.events[0].id
    store.record_delivery("ci", [second.events[0].id], state="pending", now=T0 + 21, next_attempt_at=T0 + 99,
                          error="HTTP 503", http_status=503)  # fmt: skip
    rows = store.deliveries_of([second.events[0].id])[second.events[0].id]
    assert [(d.notifier, d.state, d.attempts, d.last_status) for d in rows] == [("ci", "pending", 1, 503)]
    store.record_delivery("ci", [second.events[0].id], state="dead", now=T0 + 22, error="HTTP 400")
    stats = {s.notifier: s.pending for s in store.outbox_stats()}
    assert stats == {"ci": 1, "slack": 2}
    assert store.redeliver(now=T0 + 30, dead=True, notifier="slack") == 0
    assert store.redeliver(now=T0 + 30, dead=True) == 1
    assert store.redeliver(now=T0 + 31, event_ids=[ids[0]], notifier="log") == 1
    assert [(d.notifier, d.state) for d in store.deliveries_of([ids[0]])[ids[0]]] == [
        ("ci", "delivered"), ("log", "pending"), ("slack", "pending")
    ]  # fmt: skip
    with pytest.raises(StoreError, match="no event"):
        store.redeliver(now=T0 + 32, event_ids=["evt_nope"])
    assert set(store.events_by_id([ids[0], "evt_nope"])) == {ids[0]}


def test_pool_stats_report_size_and_waiting_clients(store: PostgresStore) -> None:
    stats = store.pool_stats()
    assert set(stats) == {"pool_size", "requests_waiting"}
    assert stats["pool_size"] >= 1 and stats["requests_waiting"] == 0


async def test_the_dispatcher_delivers_in_lane_order_from_postgresql(pg_url: str, tmp_path: Any) -> None:
    """The real dispatcher and a verifying receiver over PostgresStore: retries keep per-lane order."""
    from test_delivery import SECRET, Rig, webhook

    from watcher.delivery.dispatch import Dispatcher
    from watcher.testing.receiver import Answer, Receiver

    with Receiver(secret=SECRET) as receiver:
        receiver.script(Answer(status=500, times=2))
        rig = Rig(tmp_path, webhook(receiver))
        rig.store.close()
        rig.store = PostgresStore(pg_url)  # type: ignore[assignment]
        rig.dispatcher = Dispatcher(store=rig.store, notifiers=rig.dispatcher.notifiers, configs=rig.config.notifiers)
        ids: list[str] = []
        for step in range(1, 6):
            ids += rig.commit(REF, step)
        await rig.run_until(lambda: sum(r.status == 200 for r in receiver.deliveries()) == 5)
        assert [r.webhook_id for r in receiver.deliveries() if r.status == 200] == ids
        assert all(got.verified for got in receiver.deliveries())
        assert {state for rows in rig.states(ids).values() for _, state in rows} == {"delivered"}
        await rig.close()


def test_a_database_outage_fails_polls_safely_and_the_store_recovers(pg_url: str, pg_cluster: Any) -> None:
    """Like a Hub outage: polls fail with a StoreError (nothing committed, no URL in it), then work again."""
    store = PostgresStore(pg_url, new_id=counter_ids(), connect_timeout_s=2)
    try:
        apply(store, success(cp(1)))
        pg_cluster.stop()
        try:
            with pytest.raises(StoreError) as caught:
                store.apply_poll(REF, success(cp(1), cp(2)), options=OPTIONS, now=T0 + 1)
            assert "unreachable" in str(caught.value) and str(pg_cluster.socket_dir) not in str(caught.value)
        finally:
            pg_cluster.start()
        # the same poll, retried after the outage, announces the change once
        recovered = wait_for(
            lambda: _try(lambda: store.apply_poll(REF, success(cp(1), cp(2)), options=OPTIONS, now=T0 + 2)),
            timeout=30,
            what="the store to recover",
        )
        assert types(recovered) == [CHECKPOINT_CREATED]
        assert [e.type for e in store.recent_events()] == [CHECKPOINT_CREATED]
    finally:
        store.close()


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except StoreError:
        return None
