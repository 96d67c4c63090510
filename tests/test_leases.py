"""Leases on a throwaway PostgreSQL cluster: fair shares, release, takeover after expiry with a higher epoch,
fencing of a stale poll, and claims that never wait on a locked row."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import wait_for
from store_contract.support import OPTIONS, REF, T0, apply, counter_ids, cp, success, types

from watcher.core.models import CHECKPOINT_CREATED
from watcher.errors import LeaseLost, StoreError
from watcher.store.postgres.leases import Claim, PostgresLeases, fair_share
from watcher.store.postgres.store import PostgresStore

KEYS = [f"ox/models/ft_{i:02d}" for i in range(10)]
LONG = 60.0  # a lease that does not expire during a test
SHORT = 0.4  # a lease a test waits out


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresStore]:
    opened = PostgresStore(pg_url, new_id=counter_ids(), pool_max=8)
    yield opened
    opened.close()


@pytest.fixture
def replica(store: PostgresStore) -> Callable[..., PostgresLeases]:
    """Replicas sharing the store's pool (each with its own name and lease duration)."""

    def make(name: str, lease_s: float = LONG) -> PostgresLeases:
        return PostgresLeases(store.pool, replica=name, lease_s=lease_s)

    return make


def owners(url: str) -> dict[str, tuple[str | None, int]]:
    with psycopg.connect(url) as db:
        return {
            key: (owner, epoch) for key, owner, epoch in db.execute("SELECT fine_tune_key, owner, epoch FROM leases")
        }


def test_fair_share_is_the_ceiling() -> None:
    assert [fair_share(10, n) for n in (1, 2, 3, 4, 0)] == [10, 5, 4, 3, 10]
    assert fair_share(0, 3) == 0


def test_two_replicas_claim_disjoint_fair_shares(pg_url: str, replica: Callable[..., PostgresLeases]) -> None:
    a, b = replica("a"), replica("b")
    assert a.heartbeat() == 1
    assert b.heartbeat() == 2
    first = a.claim(KEYS)
    second = b.claim(KEYS)
    assert (first.live, first.share, len(first.acquired)) == (2, 5, 5)
    assert (second.live, second.share, len(second.acquired)) == (2, 5, 5)
    got_a, got_b = {lease.key for lease in first.acquired}, {lease.key for lease in second.acquired}
    assert got_a.isdisjoint(got_b) and got_a | got_b == set(KEYS)
    assert all(lease.epoch == 1 and lease.previous_owner is None for lease in first.acquired + second.acquired)
    assert a.claim(KEYS).acquired == ()  # already at its share
    assert a.unowned(KEYS) == 0 and a.unowned() == 0
    assert {key: owner for key, (owner, _) in owners(pg_url).items()} == {
        **dict.fromkeys(got_a, "a"),
        **dict.fromkeys(got_b, "b"),
    }


def test_a_joining_replica_gets_its_share_once_the_others_release_the_excess(
    replica: Callable[..., PostgresLeases],
) -> None:
    a, b, c = replica("a"), replica("b"), replica("c")
    assert len(a.claim(KEYS).acquired) == 10  # alone: everything
    b.heartbeat()
    assert b.claim(KEYS).acquired == ()  # nothing free yet
    released = a.release_excess(KEYS)
    assert len(released) == 5
    assert len(b.claim(KEYS).acquired) == 5
    c.heartbeat()  # three live: share 4
    assert len(a.release_excess(KEYS)) == 1 and len(b.release_excess(KEYS)) == 1
    assert len(c.claim(KEYS).acquired) == 2  # the two released, not more: nothing else is free
    assert sorted(len(r.owned()) for r in (a, b, c)) == [2, 4, 4]
    assert a.unowned(KEYS) == 0
    # a fine-tune gone from this replica's config is released whatever the share
    mine = [lease.key for lease in a.owned()]
    assert a.release_excess([k for k in KEYS if k != mine[0]]) == [mine[0]]
    assert a.unowned(KEYS) == 1


def test_renew_release_leave_and_unowned(pg_url: str, replica: Callable[..., PostgresLeases]) -> None:
    a = replica("a")
    claimed = a.claim(KEYS[:3])
    renewed = a.renew()
    assert [lease.key for lease in renewed] == KEYS[:3]
    assert all(r.expires_at >= c.expires_at for r, c in zip(renewed, claimed.acquired))
    assert all(r.epoch == c.epoch for r, c in zip(renewed, claimed.acquired))  # renewing keeps the epoch
    assert a.release([KEYS[0], "ox/models/not-mine"]) == [KEYS[0]]
    assert a.unowned(KEYS[:3]) == 1 and a.unowned(KEYS[:5]) == 3  # never-claimed keys count as unowned
    assert [lease.key for lease in a.owned()] == KEYS[1:3]
    again = a.claim(KEYS[:3])
    assert [(lease.key, lease.epoch) for lease in again.acquired] == [(KEYS[0], 2)]  # a new claim: a new epoch
    assert a.live() == 1
    a.leave()
    assert a.live() == 0 and a.owned() == [] and a.unowned(KEYS[:3]) == 3
    assert all(owner is None for owner, _ in owners(pg_url).values())


def test_once_style_claim_takes_every_free_lease_then_releases(replica: Callable[..., PostgresLeases]) -> None:
    daemon, once = replica("daemon"), replica("once")
    daemon.heartbeat()
    taken = {lease.key for lease in daemon.claim(KEYS[:4], up_to=2).acquired}
    got = once.claim(KEYS[:4], up_to=4)
    assert {lease.key for lease in got.acquired} == set(KEYS[:4]) - taken  # only free ones
    assert sorted(once.release([lease.key for lease in got.acquired])) == sorted(set(KEYS[:4]) - taken)


def test_takeover_after_expiry_raises_the_epoch(pg_url: str, replica: Callable[..., PostgresLeases]) -> None:
    dead, survivor = replica("dead", lease_s=SHORT), replica("survivor")
    before = {lease.key: lease.epoch for lease in dead.claim(KEYS[:4]).acquired}
    assert len(before) == 4
    survivor.heartbeat()
    # the dead replica stops renewing: once its heartbeat and leases expire, the survivor is alone and takes all
    claims: list[Claim] = []
    wait_for(lambda: claims.append(survivor.claim(KEYS[:4])) or sum(len(c.acquired) for c in claims) == 4,
             timeout=20, what="takeover")  # fmt: skip
    taken = [lease for claim in claims for lease in claim.acquired]
    assert {lease.key: lease.epoch for lease in taken} == {key: epoch + 1 for key, epoch in before.items()}
    assert {lease.previous_owner for lease in taken} == {"dead"}
    assert survivor.live() == 1
    assert dead.renew() == []  # the old owner learns it lost them (and is live again: it will claim its share)
    assert survivor.live() == 2
    assert {owner for owner, _ in owners(pg_url).values()} == {"survivor"}


def test_a_stale_epoch_commits_nothing(
    pg_url: str, store: PostgresStore, replica: Callable[..., PostgresLeases]
) -> None:
    paused, other = replica("paused", lease_s=SHORT), replica("other")
    [lease] = paused.claim([REF.key]).acquired
    apply(store, success(cp(1)), fence=("paused", lease.epoch))  # the baseline, under the lease
    other.heartbeat()
    wait_for(lambda: other.claim([REF.key]).acquired, timeout=20, what="takeover")
    with psycopg.connect(pg_url) as db:
        before = [
            db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("fine_tunes", "events", "checkpoints")
        ]
    # the paused replica resumes and commits the poll it made under its old epoch: fenced, nothing written
    with pytest.raises(LeaseLost, match=r"; poll not committed$"):
        store.apply_poll(REF, success(cp(1), cp(2)), options=OPTIONS, now=T0 + 1, fence=("paused", lease.epoch))
    with pytest.raises(LeaseLost):  # nor under a name that never held it
        store.apply_poll(REF, success(cp(1), cp(2)), options=OPTIONS, now=T0 + 1, fence=("other", lease.epoch))
    with psycopg.connect(pg_url) as db:
        after = [
            db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("fine_tunes", "events", "checkpoints")
        ]
    assert after == before
    # the new owner, at the new epoch, announces the change exactly once
    committed = apply(store, success(cp(1), cp(2)), now=T0 + 2, fence=("other", lease.epoch + 1))
    assert types(committed) == [CHECKPOINT_CREATED]
    assert [e.type for e in store.recent_events()] == [CHECKPOINT_CREATED]


def test_a_poll_under_a_fence_holds_off_a_takeover_until_it_commits(
    pg_url: str, store: PostgresStore, replica: Callable[..., PostgresLeases]
) -> None:
    owner, other = replica("owner", lease_s=SHORT), replica("other")
    [lease] = owner.claim([REF.key]).acquired
    other.heartbeat()
    with psycopg.connect(pg_url) as poll:  # a poll in flight: its transaction holds the lease row (KEY SHARE)
        poll.execute("SELECT 1 FROM leases WHERE fine_tune_key = %s FOR KEY SHARE", (REF.key,))
        wait_for(lambda: owner.live() == 1, timeout=20, what="the owner's heartbeat to expire")
        assert other.claim([REF.key]).acquired == ()  # skipped, not waited on
        assert [lease.key for lease in owner.renew()] == [REF.key]  # renewing is not blocked by the poll
    assert lease.epoch == 1


def test_skip_locked_claims_never_wait_on_a_locked_row(pg_url: str, replica: Callable[..., PostgresLeases]) -> None:
    a = replica("a")
    a.claim(KEYS[:3], up_to=0)  # creates the rows, takes none
    with psycopg.connect(pg_url) as holder:  # another transaction holds a row lock and stays open
        holder.execute("SELECT 1 FROM leases WHERE fine_tune_key = %s FOR UPDATE", (KEYS[0],))
        result: list[Any] = []
        thread = threading.Thread(target=lambda: result.append(a.claim(KEYS[:3], up_to=3)))
        thread.start()
        thread.join(10)
        finished = not thread.is_alive()
    thread.join(10)
    assert finished, "claim waited on a locked row"
    assert [lease.key for lease in result[0].acquired] == KEYS[1:3]
    assert [lease.key for lease in a.claim(KEYS[:3], up_to=3).acquired] == [KEYS[0]]  # free once unlocked


def test_a_replica_stalled_inside_a_poll_transaction_holds_off_no_takeover_past_its_lease(pg_url: str) -> None:
    # the paused replica's poll stops mid-transaction (its process frozen by SIGSTOP, say): after the fence check,
    # holding the lease row (KEY SHARE), the fine-tune's advisory lock and its state row
    stalled, resume = threading.Event(), threading.Event()
    ids = counter_ids()

    def new_id() -> str:  # called inside the poll's transaction, for each event it commits
        stalled.set()
        resume.wait(30)
        return ids()

    lease_s = 1.0
    paused = PostgresStore(pg_url, new_id=new_id, idle_limit_s=lease_s)
    other = PostgresStore(pg_url, new_id=counter_ids("evt_o"))
    outcome: list[BaseException | None] = []
    try:
        paused_leases = PostgresLeases(paused.pool, replica="paused", lease_s=lease_s)
        other_leases = PostgresLeases(other.pool, replica="other", lease_s=LONG)
        [lease] = paused_leases.claim([REF.key]).acquired
        apply(paused, success(cp(1)), fence=("paused", lease.epoch))  # the baseline: no event, no stall

        def poll() -> None:
            try:
                paused.apply_poll(REF, success(cp(1), cp(2)), options=OPTIONS, now=T0 + 1, fence=("paused", 1))
            except BaseException as err:  # the test reads it
                outcome.append(err)
            else:
                outcome.append(None)

        thread = threading.Thread(target=poll)
        thread.start()
        assert stalled.wait(10), "the poll never reached its events"
        started = time.monotonic()
        other_leases.heartbeat()
        # the server ends the stalled transaction once it has been idle for the lease: the row is free to take
        [taken] = wait_for(lambda: other_leases.claim([REF.key]).acquired, timeout=25, what="the takeover")
        took = time.monotonic() - started
        assert (taken.owner, taken.epoch, taken.previous_owner) == ("other", 2, "paused")
        # freed by the server after the 1 s lease, not when the stalled poll resumes (30 s, or never): the bound
        # sits between, with room for a loaded machine
        assert took < 15, took
        resume.set()
        thread.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], StoreError), outcome  # nothing committed
        assert paused.recent_events() == []
        # the new owner announces the change, once
        committed = apply(other, success(cp(1), cp(2)), now=T0 + 2, fence=("other", taken.epoch))
        assert types(committed) == [CHECKPOINT_CREATED]
        assert [e.type for e in other.recent_events()] == [CHECKPOINT_CREATED]
    finally:
        resume.set()
        paused.close()
        other.close()
