"""The lease keeper against an in-memory Leases fake and an injected clock: what it counts, what it owns, when it
stops polling and delivering, and how it comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence

import pytest
from prometheus_client import CollectorRegistry

from watcher.daemon.replicas.keeper import LeaseKeeper
from watcher.errors import StoreError
from watcher.observe.metrics import Metrics
from watcher.store.postgres.leases import Claim, Lease, fair_share, is_source_lease, source_lease_key

KEYS = [f"acme/bot/ft_{n}" for n in range(4)]


class FakeLeases:
    """Leases in a dict, shared by the fakes of several replicas; `down` makes every call fail."""

    def __init__(self, replica: str, table: dict[str, tuple[str | None, int]], live: list[str]) -> None:
        self.replica = replica
        self.table = table  # key -> (owner, epoch)
        self.live_names = live
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreError("cannot renew leases: the PostgreSQL database is unreachable (OperationalError)")

    def heartbeat(self) -> int:
        self._check()
        return len(self.live_names)

    def claim(self, keys: Sequence[str], *, up_to: int | None = None) -> Claim:
        self._check()
        share = fair_share(len(keys), len(self.live_names)) if up_to is None else up_to
        owned = sum(1 for key in keys if self.table.get(key, (None, 0))[0] == self.replica)
        acquired = []
        for key in sorted(keys):
            owner, epoch = self.table.get(key, (None, 0))
            if owner is None and owned + len(acquired) < share:
                self.table[key] = (self.replica, epoch + 1)
                acquired.append(Lease(key, self.replica, epoch + 1, 0.0))
        return Claim(tuple(acquired), len(self.live_names), share, owned + len(acquired))

    def renew(self) -> list[Lease]:
        self._check()
        return [Lease(k, o, e, 0.0) for k, (o, e) in sorted(self.table.items()) if o == self.replica]

    def release(self, keys: Sequence[str]) -> list[str]:
        self._check()
        gone = [k for k in keys if self.table.get(k, (None, 0))[0] == self.replica]
        for key in gone:
            self.table[key] = (None, self.table[key][1])
        return sorted(gone)

    def release_excess(self, keys: Sequence[str], *, sources: bool = False) -> list[str]:
        self._check()
        mine = [k for k, (o, _) in sorted(self.table.items()) if o == self.replica and is_source_lease(k) == sources]
        share = fair_share(len(keys), len(self.live_names))
        return self.release([k for k in mine if k not in keys] + [k for k in mine if k in keys][share:])

    def owned(self) -> list[Lease]:
        return self.renew()

    def live(self) -> int:
        return len(self.live_names)

    def unowned(self, keys: Sequence[str] | None = None) -> int:
        self._check()
        return sum(1 for key in keys or self.table if self.table.get(key, (None, 0))[0] is None)

    def leave(self) -> None:
        self._check()
        self.release([k for k, (o, _) in self.table.items() if o == self.replica])
        self.live_names.remove(self.replica)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A LeaseListener that wants KEYS (and `sources`) and records what the rounds tell it."""

    def __init__(self, sources: Sequence[str] = ()) -> None:
        self.sources = list(sources)
        self.gained: list[list[str]] = []
        self.lost_keys: list[list[str]] = []
        self.moved: list[tuple[list[str], list[str]]] = []

    def wanted(self) -> Sequence[str]:
        return KEYS

    def source_keys(self) -> Sequence[str]:
        return self.sources

    def lost(self, keys: Collection[str]) -> None:
        self.lost_keys.append(sorted(keys))

    def sources_changed(self, acquired: Collection[str], lost: Collection[str]) -> None:
        self.moved.append((sorted(acquired), sorted(lost)))

    async def acquired(self, keys: Collection[str]) -> None:
        self.gained.append(sorted(keys))

    async def after_round(self) -> None:
        pass


def _keeper(
    leases: FakeLeases, clock: Clock, metrics: Metrics | None, *, sources: Sequence[str] = ()
) -> tuple[LeaseKeeper, Recorder]:
    keeper = LeaseKeeper(leases, lease_s=15, renew_s=5, metrics=metrics, clock=clock)
    recorder = Recorder(sources)
    keeper.attach(recorder)
    return keeper, recorder


def _changes(metrics: Metrics) -> dict[str, float]:
    return {
        change: metrics.registry.get_sample_value("oxen_watcher_lease_changes_total", {"change": change}) or 0.0
        for change in ("acquired", "released", "expired", "fenced")
    }


@pytest.fixture
def metrics() -> Metrics:
    found = Metrics(CollectorRegistry(), version="test")
    found.enable_replicas()
    return found


def test_every_change_counter_starts_at_zero(metrics):
    assert _changes(metrics) == {"acquired": 0, "released": 0, "expired": 0, "fenced": 0}


def test_a_lone_replica_claims_all_then_gives_half_to_a_second_one(metrics):
    table: dict[str, tuple[str | None, int]] = {}
    live = ["a"]
    clock = Clock()
    keeper, recorder = _keeper(FakeLeases("a", table, live), clock, metrics)
    gained, lost = recorder.gained, recorder.lost_keys
    asyncio.run(keeper.step())
    assert sorted(keeper.owned) == KEYS and gained == [KEYS]
    assert keeper.fence(KEYS[0]) == ("a", 1)
    assert keeper.lanes() == KEYS
    assert metrics.registry.get_sample_value("oxen_watcher_leases_owned") == 4
    assert metrics.registry.get_sample_value("oxen_watcher_fine_tunes_unowned") == 0
    live.append("b")
    clock.now += 5
    asyncio.run(keeper.step())
    assert len(keeper.owned) == 2 and lost == [KEYS[2:]]
    assert keeper.fence(KEYS[3]) is None and not keeper.owns(KEYS[3])
    assert _changes(metrics) == {"acquired": 4, "released": 2, "expired": 0, "fenced": 0}
    assert metrics.registry.get_sample_value("oxen_watcher_replicas_live") == 2


def test_a_lease_taken_over_counts_as_expired_and_a_fenced_commit_drops_the_fine_tune(metrics):
    table: dict[str, tuple[str | None, int]] = {}
    clock = Clock()
    keeper, recorder = _keeper(FakeLeases("a", table, ["a"]), clock, metrics)
    lost = recorder.lost_keys
    asyncio.run(keeper.step())
    table[KEYS[0]] = ("b", 2)  # another replica took it over while this one was paused
    asyncio.run(keeper.step())
    assert not keeper.owns(KEYS[0]) and lost == [[KEYS[0]]]
    keeper.fenced(KEYS[1], 7)  # a commit under an epoch this replica no longer holds: counted, lease kept
    assert keeper.owns(KEYS[1])
    keeper.fenced(KEYS[1], 1)
    assert not keeper.owns(KEYS[1]) and lost[-1] == [KEYS[1]]
    assert _changes(metrics)["expired"] == 1 and _changes(metrics)["fenced"] == 2


def test_renewals_failing_past_the_lease_stop_polling_and_delivering_until_the_database_answers(metrics):
    table: dict[str, tuple[str | None, int]] = {}
    clock = Clock()
    leases = FakeLeases("a", table, ["a"])
    keeper, recorder = _keeper(leases, clock, metrics)
    gained, lost = recorder.gained, recorder.lost_keys
    asyncio.run(keeper.step())
    leases.down = True
    clock.now += 5
    asyncio.run(keeper.step())
    # failing, but within the lease: still owned, still polled and delivered
    assert keeper.problem() is None and keeper.fence(KEYS[0]) == ("a", 1) and keeper.lanes() == KEYS
    clock.now += 11
    assert keeper.stale() and keeper.fence(KEYS[0]) is None and keeper.lanes() == []
    assert "lease renewals failing for 16s" in (keeper.problem() or "")
    asyncio.run(keeper.step())
    assert keeper.owned == {} and lost == [KEYS]
    assert metrics.registry.get_sample_value("oxen_watcher_leases_owned") == 0
    leases.down = False  # the database is back; nobody took the leases over, so they are still this replica's
    clock.now += 5
    asyncio.run(keeper.step())
    assert keeper.problem() is None and sorted(keeper.owned) == KEYS and gained[-1] == KEYS
    assert keeper.fence(KEYS[0]) == ("a", 1)  # same epoch: nobody polled it meanwhile
    assert _changes(metrics) == {"acquired": 8, "released": 0, "expired": 4, "fenced": 0}


def test_a_paused_process_keeps_its_fences_so_the_database_fences_its_commits_but_delivers_nothing(metrics):
    table: dict[str, tuple[str | None, int]] = {}
    clock = Clock()
    keeper, _ = _keeper(FakeLeases("a", table, ["a"]), clock, metrics)
    asyncio.run(keeper.step())
    clock.now += 40  # SIGSTOP for longer than the lease: no renewal failed, none was tried
    assert not keeper.stale() and keeper.problem() is None
    assert keeper.fence(KEYS[0]) == ("a", 1)  # a poll tries, and its commit is fenced if the lease moved on
    assert keeper.lanes() == []  # but no delivery of a lane that may be someone else's now


class FailingOnce(Recorder):
    """A listener whose first takeover fails to load (the database answered the claim, then not the read)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def acquired(self, keys: Collection[str]) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreError("cannot read state: the PostgreSQL database is unreachable (OperationalError)")
        await super().acquired(keys)


def test_a_failed_takeover_releases_its_leases_and_a_later_round_takes_them_again(metrics):
    table: dict[str, tuple[str | None, int]] = {}
    keeper = LeaseKeeper(FakeLeases("a", table, ["a"]), lease_s=15, renew_s=5, metrics=metrics, clock=Clock())
    listener = FailingOnce()
    keeper.attach(listener)
    asyncio.run(keeper.step())  # never raises out of a round
    # nothing is leased but not scheduled: the leases are given back for anyone to take
    assert keeper.owned == {} and all(owner is None for owner, _ in table.values())
    assert listener.gained == [] and listener.lost_keys == [KEYS]
    assert metrics.registry.get_sample_value("oxen_watcher_leases_owned") == 0
    asyncio.run(keeper.step())
    assert sorted(keeper.owned) == KEYS and listener.gained == [KEYS]
    assert keeper.fence(KEYS[0]) == ("a", 2)


def test_a_failed_takeover_whose_release_fails_too_is_taken_again_by_the_next_round(metrics):
    table: dict[str, tuple[str | None, int]] = {}
    leases = FakeLeases("a", table, ["a"])
    keeper = LeaseKeeper(leases, lease_s=15, renew_s=5, metrics=metrics, clock=Clock())
    listener = FailingOnce()

    async def down_then_fail(keys: Collection[str]) -> None:
        leases.down = True  # the database went away: the release fails as well
        await FailingOnce.acquired(listener, keys)

    listener.acquired = down_then_fail  # type: ignore[method-assign]
    keeper.attach(listener)
    asyncio.run(keeper.step())
    assert keeper.owned == {} and all(owner == "a" for owner, _ in table.values())  # still leased in the database
    leases.down = False
    asyncio.run(keeper.step())  # renewed and not scheduled here: adopted again, and loaded this time
    assert sorted(keeper.owned) == KEYS and listener.gained == [KEYS]


def test_leave_releases_everything(metrics):
    table: dict[str, tuple[str | None, int]] = {}
    live = ["a"]
    keeper, _ = _keeper(FakeLeases("a", table, live), Clock(), metrics)
    asyncio.run(keeper.step())
    asyncio.run(keeper.leave())
    assert all(owner is None for owner, _ in table.values()) and live == []
    assert keeper.owned == {} and _changes(metrics)["released"] == 4


SOURCES = [source_lease_key("acme", "bot"), source_lease_key("acme", "lab")]


async def test_sources_are_claimed_in_the_same_rounds_with_a_share_of_their_own_and_lost_like_fine_tunes(metrics):
    table: dict[str, tuple[str | None, int]] = {}
    a, b = FakeLeases("a", table, ["a", "b"]), FakeLeases("b", table, ["a", "b"])
    clock = Clock()
    keeper, recorder = _keeper(a, clock, metrics, sources=SOURCES)
    gained, lost, moved = recorder.gained, recorder.lost_keys, recorder.moved
    await keeper.step()
    other, _ = _keeper(b, clock, None, sources=SOURCES)
    await other.step()
    # two fine-tunes and one source each: the sources' share is ceil(2 / 2), not part of the fine-tunes' share
    assert sorted(keeper.owned) == KEYS[:2] and sorted(other.owned) == KEYS[2:]
    assert list(keeper.sources_owned) == [SOURCES[0]] and list(other.sources_owned) == [SOURCES[1]]
    assert moved == [([SOURCES[0]], [])] and gained == [KEYS[:2]]
    assert keeper.source_fence(SOURCES[0]) == ("a", 1) and keeper.source_fence(SOURCES[1]) is None
    assert metrics.registry.get_sample_value("oxen_watcher_leases_owned") == 3
    assert _changes(metrics)["acquired"] == 3
    # a fenced source read drops the source at once (and only it), counted like a fenced poll
    keeper.fenced(SOURCES[0], 1)
    assert keeper.sources_owned == {} and sorted(keeper.owned) == KEYS[:2]
    assert moved[-1] == ([], [SOURCES[0]]) and lost == []
    assert _changes(metrics)["fenced"] == 1 and metrics.registry.get_sample_value("oxen_watcher_leases_owned") == 2
    # the next round finds it still recorded as this replica's and takes it back; an outage past the lease
    # then stops the reads with the polls
    await keeper.step()
    assert list(keeper.sources_owned) == [SOURCES[0]]
    a.down = True
    clock.now += 16
    await keeper.step()
    await keeper.step()
    assert keeper.sources_owned == {} and keeper.owned == {}
    assert moved[-1] == ([], [SOURCES[0]]) and lost[-1] == KEYS[:2]
    assert keeper.source_fence(SOURCES[0]) is None
