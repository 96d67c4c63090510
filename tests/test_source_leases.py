"""Discovery sources' leases on a throwaway PostgreSQL cluster: a kind of their own in the lease table (own fair
share, never released or counted with the fine-tunes), a source read's commit fenced by its lease, and what a
source watches shared through the database; how a replica merges that with what it reads itself; and a status
commit fenced by the fine-tune's lease like a poll."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from store_contract.support import REF, T0, counter_ids

from watcher.config.discovery import DiscoverConfig
from watcher.core.lifecycle import LifecycleOptions
from watcher.core.models import FINE_TUNE_DISCOVERED, EventDraft, FineTuneRef, HubFineTune, SourceState
from watcher.daemon.replicas.sources import lease_key, merge
from watcher.errors import LeaseLost
from watcher.store.postgres.leases import PostgresLeases, is_source_lease, source_lease_key
from watcher.store.postgres.store import PostgresStore
from watcher.store.replicas import ListedStatuses

FINE_TUNES = [f"acme/lab/ft_{i}" for i in range(4)]
SOURCES = [source_lease_key("acme", "lab"), source_lease_key("acme", "bot")]
LONG = 60.0


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresStore]:
    opened = PostgresStore(pg_url, new_id=counter_ids(), pool_max=8)
    yield opened
    opened.close()


def _ref(fine_tune_id: str, repo: str = "lab") -> FineTuneRef:
    return FineTuneRef("acme", repo, fine_tune_id, f"run-{fine_tune_id}")


def _discovered(ref: FineTuneRef) -> EventDraft:
    return EventDraft(FINE_TUNE_DISCOVERED, {"fine_tune": ref.as_data(), "source": "lab"})


def test_a_source_lease_key_never_looks_like_a_fine_tune_key() -> None:
    assert SOURCES[0] == "source:acme/lab" and is_source_lease(SOURCES[0])
    # a fine-tune key has two '/': even one whose namespace starts like a source's is a fine-tune's
    assert not is_source_lease("source:acme/lab/ft_1") and not is_source_lease("acme/lab/ft_1")
    assert lease_key(DiscoverConfig(name="x", namespace="acme", repo="lab")) == SOURCES[0]


def test_sources_have_their_own_fair_share_and_are_never_released_with_the_fine_tunes(store: PostgresStore) -> None:
    a = PostgresLeases(store.pool, replica="a", lease_s=LONG)
    b = PostgresLeases(store.pool, replica="b", lease_s=LONG)
    a.heartbeat(), b.heartbeat()
    assert len(a.claim(FINE_TUNES).acquired) == 2 and len(b.claim(FINE_TUNES).acquired) == 2
    assert [lease.key for lease in a.claim(SOURCES).acquired] == [SOURCES[1]]  # share ceil(2 / 2) = 1
    assert [lease.key for lease in b.claim(SOURCES).acquired] == [SOURCES[0]]
    # the fine-tunes' round releases what is not a fine-tune it wants: never a source's lease
    assert a.release_excess(FINE_TUNES) == [] and a.release_excess(FINE_TUNES[:1]) != []
    assert SOURCES[1] in {lease.key for lease in a.owned()}
    # and the sources' round releases a source no longer configured, never a fine-tune
    assert a.release_excess([], sources=True) == [SOURCES[1]]
    assert all(not is_source_lease(lease.key) for lease in a.owned())
    assert a.unowned() == 1  # the fine-tune released above; the free source lease is not a fine-tune
    renewed = {lease.key for lease in b.renew()}
    assert SOURCES[0] in renewed and len(renewed) == 3  # one renewal covers both kinds


def test_a_source_read_commits_only_under_its_lease_at_its_epoch(store: PostgresStore, pg_url: str) -> None:
    a = PostgresLeases(store.pool, replica="a", lease_s=LONG)
    (lease,) = a.claim(SOURCES[:1]).acquired
    fence = (lease.key, "a", lease.epoch)
    first, second = _ref("ft_0"), _ref("ft_1")
    state = SourceState(baselined=True, known_ids=frozenset({"ft_0"}))
    store.apply_discovery("lab", state, [], now=T0, sources=[(first, False)], fence=fence, watching=[first])
    assert store.load_watching(["lab", "other"]) == {"lab": [first]}
    # another replica takes the source over (a higher epoch): the stale reader's commit is refused whole
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE leases SET owner = 'b', epoch = epoch + 1 WHERE fine_tune_key = %s", (lease.key,))
    newer = SourceState(baselined=True, known_ids=frozenset({"ft_0", "ft_1"}))
    with pytest.raises(LeaseLost, match=r"; source read not committed$"):  # says what was refused: not a poll
        store.apply_discovery(
            "lab",
            newer,
            [(second, _discovered(second))],
            now=T0 + 1,
            sources=[(first, False), (second, True)],
            fence=fence,
            watching=[first, second],
        )
    assert store.load_source("lab") == state
    assert store.load_watching(["lab"]) == {"lab": [first]}
    assert store.recent_events(limit=10) == []
    assert "acme/lab/ft_1" not in store.load_lifecycle()
    # unfenced (SQLite's way, and a source read before any replica wrote it): no watch set is written
    store.apply_discovery("solo", state, [], now=T0)
    assert store.load_watching(["solo"]) == {}


def test_a_source_read_stores_the_statuses_it_listed_for_the_other_owners(store: PostgresStore, pg_url: str) -> None:
    a = PostgresLeases(store.pool, replica="a", lease_s=LONG)
    (lease,) = a.claim(SOURCES[:1]).acquired
    fence = (lease.key, "a", lease.epoch)
    state = SourceState(baselined=True, known_ids=frozenset({"ft_0", "ft_1"}))
    listed = ListedStatuses(
        read_at=T0 + 5,
        fine_tunes=(
            HubFineTune("ft_0", name="run-ft_0", status="running", started_at="2026-12-01T00:00:00Z"),
            HubFineTune("ft_1", status="error", error="OOM", finished_at="2026-12-01T01:00:00Z", created_by="amy"),
        ),
    )
    store.apply_discovery("lab", state, [], now=T0 + 5, fence=fence, watching=[_ref("ft_0")], listed=listed)
    assert store.load_listed(["lab", "other"]) == {"lab": listed}
    # a commit without statuses (an earlier release's reader) keeps the last ones; a stale reader writes none
    store.apply_discovery("lab", state, [], now=T0 + 6, fence=fence, watching=[_ref("ft_0")])
    assert store.load_listed(["lab"]) == {"lab": listed}
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE leases SET owner = 'b', epoch = epoch + 1 WHERE fine_tune_key = %s", (lease.key,))
    newer = ListedStatuses(read_at=T0 + 9, fine_tunes=(HubFineTune("ft_0", status="completed"),))
    with pytest.raises(LeaseLost):
        store.apply_discovery("lab", state, [], now=T0 + 9, fence=fence, watching=[_ref("ft_0")], listed=newer)
    assert store.load_listed(["lab"]) == {"lab": listed}
    store.apply_discovery("solo", state, [], now=T0)  # unfenced (SQLite's way): nothing is listed
    assert store.load_listed(["solo"]) == {}


def _source(name: str, repo: str = "lab") -> DiscoverConfig:
    return DiscoverConfig(name=name, namespace="acme", repo=repo)


def test_merge_takes_what_this_replica_reads_from_memory_and_the_rest_from_the_database() -> None:
    mine, theirs = _source("mine", "bot"), _source("theirs")
    bot, lab, both = _ref("ft_b", "bot"), _ref("ft_l"), _ref("ft_x")
    current = {bot.key: (bot, "mine"), _ref("ft_gone").key: (_ref("ft_gone"), "theirs")}
    stored = {"theirs": [lab], "mine": [_ref("ft_stale", "bot")]}
    merged = merge([mine, theirs], current, lambda source: source.name == "mine", stored)
    assert merged == {bot.key: (bot, "mine"), lab.key: (lab, "theirs")}
    # watched by two sources: stays with the one that has it, else goes to the first configured
    stored = {"a": [both], "b": [both]}
    sources = [_source("a"), _source("b")]
    assert merge(sources, {both.key: (both, "b")}, lambda _: False, stored)[both.key] == (both, "b")
    assert merge(sources, {}, lambda _: False, stored)[both.key] == (both, "a")
    assert merge(sources, {}, lambda _: False, {}) == {}


def test_a_status_commit_is_fenced_by_the_fine_tunes_lease_like_a_poll(store: PostgresStore, pg_url: str) -> None:
    a = PostgresLeases(store.pool, replica="a", lease_s=LONG)
    (lease,) = a.claim([REF.key]).acquired
    fence = ("a", lease.epoch)
    options = LifecycleOptions()
    store.apply_lifecycle(REF, _hub("running"), options=options, now=T0, fence=fence)
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE leases SET owner = 'b', epoch = epoch + 1 WHERE fine_tune_key = %s", (REF.key,))
    # the stale owner announces no `completed` the new owner will announce too, and says what was refused
    with pytest.raises(LeaseLost, match=r"; status change not committed$"):
        store.apply_lifecycle(REF, _hub("completed"), options=options, now=T0 + 1, fence=fence)
    assert store.load_lifecycle([REF.key])[REF.key].state.status == "running"
    assert store.recent_events(limit=10) == []
    done = store.apply_lifecycle(REF, _hub("completed"), options=options, now=T0 + 2, fence=("b", lease.epoch + 1))
    assert [event.type for event in done.events] == ["fine_tune.status_changed"]


def _hub(status: str) -> HubFineTune:
    return HubFineTune(REF.id, name=REF.name, status=status)
