"""Contract: the event log, newest first with a type glob (fnmatch rules), oldest first after a sequence."""

from __future__ import annotations

from watcher.core.models import (
    CHECKPOINT_CREATED,
    CHECKPOINT_DEPLOYMENT_CHANGED,
    CHECKPOINT_REMOVED,
    FINE_TUNE_NOT_FOUND,
    PollNotFound,
)
from watcher.store import Store

from .support import OTHER, T0, apply, cp, success


def build_history(store: Store) -> None:
    apply(store, success(cp(1)), now=T0)
    apply(store, success(cp(1), cp(2)), now=T0 + 1)  # created 2
    apply(store, success(cp(1), cp(2, status="ACTIVE")), now=T0 + 2)  # deployment_changed 2
    apply(store, success(cp(2, status="ACTIVE")), now=T0 + 3)  # removed 1
    apply(store, PollNotFound(), ref=OTHER, now=T0 + 4)  # not_found (other)
    apply(store, success(cp(2, status="ACTIVE"), cp(3)), now=T0 + 5)  # created 3


ALL_TYPES = [
    CHECKPOINT_CREATED,
    FINE_TUNE_NOT_FOUND,
    CHECKPOINT_REMOVED,
    CHECKPOINT_DEPLOYMENT_CHANGED,
    CHECKPOINT_CREATED,
]


def test_recent_events_newest_first_with_limit_and_glob(store: Store) -> None:
    build_history(store)
    recent = store.recent_events()
    assert [e.type for e in recent] == ALL_TYPES
    assert [e.timestamp for e in recent] == sorted((e.timestamp for e in recent), reverse=True)
    assert [e.type for e in store.recent_events(limit=2)] == ALL_TYPES[:2]
    assert [e.type for e in store.recent_events(limit=1)] == ALL_TYPES[:1]
    created = store.recent_events(type_glob="checkpoint.created")
    assert [e.data["checkpoint"]["step"] for e in created] == [3, 2]
    assert [e.type for e in store.recent_events(type_glob="checkpoint.*")] == [
        t for t in ALL_TYPES if t.startswith("checkpoint.")
    ]
    assert [e.fine_tune_key for e in store.recent_events(type_glob="fine_tune.*")] == [OTHER.key]
    assert [e.type for e in store.recent_events(type_glob="checkpoint.*", limit=2)] == [
        CHECKPOINT_CREATED,
        CHECKPOINT_REMOVED,
    ]
    assert store.recent_events(type_glob="nothing.*") == []
    assert store.recent_events(type_glob="CHECKPOINT.*") == []  # types match case-sensitively


def test_recent_events_glob_follows_fnmatch_rules(store: Store) -> None:
    build_history(store)
    glob_cases = {
        "*": ALL_TYPES,
        "checkpoint.?emoved": [CHECKPOINT_REMOVED],
        "checkpoint.[cr]*": [CHECKPOINT_CREATED, CHECKPOINT_REMOVED, CHECKPOINT_CREATED],
        "checkpoint.[!cr]*": [CHECKPOINT_DEPLOYMENT_CHANGED],
        "*.not_found": [FINE_TUNE_NOT_FOUND],
        "*_*": [FINE_TUNE_NOT_FOUND, CHECKPOINT_DEPLOYMENT_CHANGED],
        "checkpoint": [],
        "[": [],
    }
    for glob, expected in glob_cases.items():
        assert [e.type for e in store.recent_events(type_glob=glob)] == expected, glob


def test_recent_events_limit_zero_returns_nothing(store: Store) -> None:
    build_history(store)
    assert store.recent_events(limit=0) == []
    assert store.recent_events(limit=0, type_glob="*") == []


def test_events_after_is_oldest_first_and_exclusive(store: Store) -> None:
    build_history(store)
    everything = store.events_after(0)
    seqs = [seq for seq, _ in everything]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) == 5
    assert [e for _, e in everything] == list(reversed(store.recent_events()))
    assert store.events_after(seqs[1]) == everything[2:]
    assert store.events_after(seqs[-1]) == []
    assert store.events_after(0, limit=2) == everything[:2]
    new = apply(store, success(cp(2, status="ACTIVE"), cp(3), cp(4)), now=T0 + 9)
    assert [e for _, e in store.events_after(seqs[-1])] == list(new.events)


def test_events_by_id(store: Store) -> None:
    build_history(store)
    recent = store.recent_events()
    wanted = [recent[0].id, recent[3].id, "evt_nope"]
    assert store.events_by_id(wanted) == {recent[0].id: recent[0], recent[3].id: recent[3]}
    assert store.events_by_id([]) == {}


def test_recent_events_of_a_rare_type_among_many_others(store: Store) -> None:
    first = apply(store, PollNotFound(), ref=OTHER, now=T0).events
    apply(store, success(cp(0)), now=T0 + 1)
    created = apply(store, success(*(cp(s) for s in range(301))), now=T0 + 2).events
    apply(store, success(cp(0)), ref=OTHER, now=T0 + 3)
    second = apply(store, PollNotFound(), ref=OTHER, now=T0 + 4).events
    assert store.recent_events(type_glob="fine_tune.*") == [*second, *first]
    assert store.recent_events(type_glob="fine_tune.*", limit=1) == list(second)
    assert store.recent_events(type_glob="checkpoint.*", limit=3) == list(reversed(created[-3:]))
    assert store.recent_events(limit=2) == [*second, created[-1]]
