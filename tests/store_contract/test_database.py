"""Contract, checked in the tables themselves: the schema version kept and a newer one refused, read-only use that
writes nothing, one transaction per poll, no needless checkpoint row writes, and two writers on one database."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from watcher.core.models import (
    CHECKPOINT_CREATED,
    CHECKPOINT_DEPLOYMENT_CHANGED,
    CHECKPOINT_REMOVED,
    PollNotFound,
    PollSuccess,
    PollUnchanged,
)
from watcher.errors import StoreError
from watcher.store import Committed, Store

from .databases import Database
from .support import OPTIONS, OTHER, REF, T0, apply, counter_ids, cp, failed, success, types

Opener = Callable[..., Store]


def test_reopening_keeps_the_schema_version_and_data(store_factory: Opener, database: Database) -> None:
    first = store_factory()
    assert first.schema_version == database.schema_version
    apply(first, success(cp(1)))
    first.close()
    before = database.snapshot()
    again = store_factory()
    assert again.schema_version == database.schema_version
    assert database.stored_versions() == [(database.schema_version,)]
    assert database.snapshot() == before


@pytest.mark.parametrize("readonly", [False, True])
def test_database_from_a_newer_version_is_refused(store_factory: Opener, database: Database, readonly: bool) -> None:
    store_factory().close()
    database.set_schema_version(database.schema_version + 1)
    with pytest.raises(StoreError, match="newer"):
        store_factory(readonly=readonly)
    assert database.stored_versions() == [(database.schema_version + 1,)]


def test_readonly_store_reads_but_never_writes(store: Store, store_factory: Opener, database: Database) -> None:
    apply(store, success(cp(1)))
    created = apply(store, success(cp(1), cp(2)), now=T0 + 1)
    before = database.snapshot()
    reader = store_factory(readonly=True)
    try:
        assert reader.recent_events() == list(created.events)
        assert [s.latest_step for s in reader.statuses()] == [2]
        dry = reader.apply_poll(REF, success(cp(1), cp(2), cp(3)), options=OPTIONS, now=T0 + 2, commit=False)
        assert dry is not None and types(dry) == [CHECKPOINT_CREATED]
        with pytest.raises(StoreError):
            reader.apply_poll(REF, success(cp(1), cp(2), cp(3)), options=OPTIONS, now=T0 + 2)
    finally:
        reader.close()
    assert database.snapshot() == before


def test_state_and_events_commit_in_one_transaction(store_factory: Opener, database: Database) -> None:
    ids = iter(["evt_a", "evt_b", "evt_dup", "evt_dup", "evt_c", "evt_d"])
    store = store_factory(new_id=lambda: next(ids))
    apply(store, success(cp(1)))
    apply(store, success(cp(1), cp(2)), now=T0 + 1)  # evt_a
    assert [row[0] for row in database.event_rows()] == ["evt_a"]
    apply(store, success(cp(1), cp(2), cp(3)), now=T0 + 2)  # evt_b
    before = database.snapshot()

    # two new checkpoints, two events with the same id: the second event insert fails
    poll = success(cp(1), cp(2), cp(3), cp(4), cp(5))
    with pytest.raises(StoreError):
        store.apply_poll(REF, poll, options=OPTIONS, now=T0 + 3)
    assert database.snapshot() == before  # no state, no checkpoint row, no event of that poll

    # the state did not move on: the same poll announces both checkpoints (in memory and on disk)
    retried = apply(store, poll, now=T0 + 4)
    assert [(e.id, e.type, e.data["checkpoint"]["step"]) for e in retried.events] == [
        ("evt_c", CHECKPOINT_CREATED, 4),
        ("evt_d", CHECKPOINT_CREATED, 5),
    ]
    assert [row[0] for row in database.event_rows()] == ["evt_a", "evt_b", "evt_c", "evt_d"]


def test_event_id_clash_with_a_committed_event_rolls_back_the_state(store_factory: Opener, database: Database) -> None:
    ids = iter(["evt_same", "evt_same"])
    store = store_factory(new_id=lambda: next(ids))
    apply(store, success(cp(1)))
    apply(store, success(cp(1), cp(2)), now=T0 + 1)
    apply(store, failed(), now=T0 + 2)
    before = database.snapshot()
    with pytest.raises(StoreError):
        store.apply_poll(REF, success(cp(1), cp(2), cp(3)), options=OPTIONS, now=T0 + 3)
    assert database.snapshot() == before
    fresh = store_factory(new_id=counter_ids("evt_new"))
    assert sorted(fresh.load_state(REF.key).checkpoints) == [1, 2]
    assert fresh.load_state(REF.key).consecutive_failures == 1
    again = apply(fresh, success(cp(1), cp(2), cp(3)), now=T0 + 4)
    assert types(again) == [CHECKPOINT_CREATED]


def test_a_poll_without_change_writes_no_checkpoint_rows(store: Store, database: Database) -> None:
    checkpoints = [cp(1), cp(2, status="ACTIVE"), cp(3, inference_samples=[{"text": "x" * 500}])]
    first = success(*checkpoints)
    apply(store, first)
    apply(store, success(*checkpoints[:2]), now=T0 + 1)
    apply(store, first, now=T0 + 2)
    writes = database.count_checkpoint_writes()
    rows_before = database.snapshot()["checkpoints"]

    # same checkpoints in a different body (another hash, another order), unchanged, failed, 404-free
    assert apply(store, success(*reversed(checkpoints), salt="other body"), now=T0 + 3).events == ()
    assert apply(store, PollUnchanged(store.load_state(REF.key).body_hash or ""), now=T0 + 4).events == ()
    assert apply(store, failed(), now=T0 + 5).events == ()
    assert apply(store, success(*checkpoints), now=T0 + 6).events == ()
    assert writes() == {}
    assert database.snapshot()["checkpoints"] == rows_before

    # a real change writes only the rows that changed
    changed = success(cp(1), cp(2, status="INACTIVE"), cp(4))  # 2 updated, 3 deleted, 4 inserted
    assert sorted(types(apply(store, changed, now=T0 + 7))) == sorted(
        [CHECKPOINT_DEPLOYMENT_CHANGED, CHECKPOINT_REMOVED, CHECKPOINT_CREATED]
    )
    assert writes() == {"insert": 1, "update": 1, "delete": 1}


def test_two_stores_on_one_database_announce_a_change_once(store_factory: Opener, database: Database) -> None:
    a = store_factory(new_id=counter_ids("evt_a"))
    b = store_factory(new_id=counter_ids("evt_b"))
    apply(a, success(cp(1)))
    apply(b, PollNotFound(), ref=OTHER)
    checkpoints = [cp(1)]
    for round_number in range(2, 22):
        checkpoints.append(cp(round_number))
        poll = success(*checkpoints)
        barrier = threading.Barrier(2)
        results: dict[str, Committed | BaseException | None] = {}

        def run(name: str, store: Store, poll: PollSuccess = poll) -> None:
            barrier.wait()
            try:
                results[name] = store.apply_poll(REF, poll, options=OPTIONS, now=T0 + round_number)
            except BaseException as err:
                results[name] = err

        threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("a", a), ("b", b))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert all(isinstance(r, Committed) for r in results.values()), results
        announced = [e for r in results.values() if isinstance(r, Committed) for e in r.events]
        assert [(e.type, e.data["checkpoint"]["step"]) for e in announced] == [(CHECKPOINT_CREATED, round_number)]
    rows = database.event_rows()
    created = [row for row in rows if row[1] == CHECKPOINT_CREATED]
    assert len(created) == 20
    assert len({row[0] for row in rows}) == len(rows)
