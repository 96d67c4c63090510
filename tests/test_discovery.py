"""Discovery: reading lists page by page (short page, all watched seen, max_pages), shifting lists, filters,
and the decision of what is new against a source's durable baseline."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import structlog

from watcher.config.discovery import DiscoverConfig
from watcher.core.discovery import ListRead, discover, finished_at, matches, ref_of
from watcher.core.models import FINE_TUNE_DISCOVERED, HubFineTune, SourceState
from watcher.daemon.source_reader import SourceReader
from watcher.errors import HubUnavailable, PollError
from watcher.hub.client import FetchedNotFound, HubClient
from watcher.testing.simhub import Fault, SimHub

TOKEN = "simhub-token"
NOW = 1_700_000_000.0
DAY = 86_400.0


def source(**fields: object) -> DiscoverConfig:
    return DiscoverConfig.model_validate({"namespace": "acme", "repo": "bot", **fields})


def ft(fine_tune_id: str, **fields: object) -> HubFineTune:
    return HubFineTune(id=fine_tune_id, **fields)  # type: ignore[arg-type]


@dataclass
class FakeHub:
    """A list endpoint over `entries` (newest first); `before_page` may change the list between pages."""

    entries: list[HubFineTune]
    before_page: Callable[[int], None] | None = None
    fail_on_page: int | None = None
    calls: list[dict[str, object]] = field(default_factory=list)

    async def list_fine_tunes(
        self,
        namespace: str,
        repo: str,
        *,
        page: int,
        page_size: int,
        created_by: str | None = None,
        status: str | None = None,
    ) -> tuple[HubFineTune, ...] | FetchedNotFound:
        self.calls.append({"namespace": namespace, "repo": repo, "page": page, "created_by": created_by})
        if self.before_page is not None:
            self.before_page(page)
        if page == self.fail_on_page:
            raise HubUnavailable("Hub answered 503", http_status=503)
        start = (page - 1) * page_size
        return tuple(self.entries[start : start + page_size])


def ids(count: int, prefix: str = "ft") -> list[HubFineTune]:
    """count fine-tunes, newest first: ft_{count-1} ... ft_0."""
    return [ft(f"{prefix}_{n}", name=f"{prefix}-{n}") for n in reversed(range(count))]


# --- reading pages ---------------------------------------------------------------------------------------


async def test_reads_until_a_short_page() -> None:
    hub = FakeHub(ids(25))
    read = await SourceReader(hub, page_size=10).read(source())
    assert isinstance(read, ListRead)
    assert [c["page"] for c in hub.calls] == [1, 2, 3]
    assert (read.pages, read.complete, read.truncated) == (3, True, False)
    assert [f.id for f in read.fine_tunes] == [f"ft_{n}" for n in reversed(range(25))]


async def test_an_exact_multiple_needs_one_empty_page() -> None:
    hub = FakeHub(ids(20))
    read = await SourceReader(hub, page_size=10).read(source())
    assert isinstance(read, ListRead)
    assert [c["page"] for c in hub.calls] == [1, 2, 3]
    assert read.complete and len(read.fine_tunes) == 20


async def test_stops_once_every_watched_fine_tune_was_seen() -> None:
    hub = FakeHub(ids(100))
    read = await SourceReader(hub, page_size=10).read(source(), watched_ids={"ft_95", "ft_81"})
    assert isinstance(read, ListRead)
    assert [c["page"] for c in hub.calls] == [1, 2]
    assert (read.complete, read.truncated) == (False, False)


async def test_max_pages_ends_a_long_read_and_is_logged_once() -> None:
    hub = FakeHub(ids(500))
    reader = SourceReader(hub, page_size=10, max_pages=3)
    with structlog.testing.capture_logs() as logs:
        first = await reader.read(source())
        second = await reader.read(source())
    assert isinstance(first, ListRead) and isinstance(second, ListRead)
    assert (first.pages, first.truncated, len(first.fine_tunes)) == (3, True, 30)
    assert second.truncated
    truncated = [entry for entry in logs if entry["event"] == "discover.list_truncated"]
    assert truncated == [
        {"event": "discover.list_truncated", "log_level": "warning", "source": "acme/bot", "pages": 3, "fine_tunes": 30}
    ]
    hub.entries = ids(5)
    with structlog.testing.capture_logs() as logs:
        third = await reader.read(source())
    assert isinstance(third, ListRead) and not third.truncated
    assert [entry["event"] for entry in logs] == ["discover.list_complete"]


async def test_a_watched_fine_tune_beyond_max_pages_leaves_the_read_truncated() -> None:
    hub = FakeHub(ids(100))
    read = await SourceReader(hub, page_size=10, max_pages=2).read(source(), watched_ids={"ft_99", "ft_3"})
    assert isinstance(read, ListRead)
    assert read.truncated


async def test_created_by_is_passed_to_the_hubs_filter() -> None:
    hub = FakeHub(ids(3))
    await SourceReader(hub).read(source(created_by="alice"))
    await SourceReader(hub).read(source())
    assert [c["created_by"] for c in hub.calls] == ["alice", None]
    assert all(c["namespace"] == "acme" and c["repo"] == "bot" for c in hub.calls)


async def test_a_failed_page_raises_and_changes_nothing() -> None:
    hub = FakeHub(ids(30), fail_on_page=2)
    # the read returns nothing at all (no partial list), so the caller's source state stays as it was
    with pytest.raises(PollError) as info:
        await SourceReader(hub, page_size=10).read(source())
    assert info.value.http_status == 503
    assert [c["page"] for c in hub.calls] == [1, 2]


async def test_a_404_list_is_returned_as_not_found() -> None:
    class Missing(FakeHub):
        async def list_fine_tunes(self, *args: object, **kwargs: object) -> FetchedNotFound:  # type: ignore[override]
            return FetchedNotFound()

    assert isinstance(await SourceReader(Missing([])).read(source()), FetchedNotFound)


async def test_a_list_that_shifts_while_read_loses_nothing_and_repeats_nothing() -> None:
    hub = FakeHub(ids(25))
    created: list[HubFineTune] = []

    def create_on_page_2(page: int) -> None:
        if page == 2:
            new = ft("ft_new", name="ft-new")
            created.append(new)
            hub.entries.insert(0, new)  # newest first: everything shifts down by one

    hub.before_page = create_on_page_2
    reader = SourceReader(hub, page_size=10)
    state = SourceState(baselined=True, known_ids=frozenset(f"ft_{n}" for n in range(25)))
    first = await reader.read(source())
    assert isinstance(first, ListRead)
    # ft_15 (last of page 1) shows up again at the top of page 2: once
    assert len(first.fine_tunes) == len({f.id for f in first.fine_tunes}) == 25
    assert "ft_new" not in first.by_id
    first_outcome = discover(source(), state, first, now=NOW)
    assert first_outcome.events == ()
    hub.before_page = None
    second = await reader.read(source())
    assert isinstance(second, ListRead)
    outcome = discover(source(), first_outcome.state, second, now=NOW)
    assert [e.data["fine_tune"]["id"] for e in outcome.events] == ["ft_new"]


async def test_a_fine_tune_deleted_during_a_read_is_not_removed() -> None:
    hub = FakeHub(ids(25))

    def delete_on_page_2(page: int) -> None:
        if page == 2:
            del hub.entries[0]  # everything shifts up: ft_14 moves to page 1 and is skipped this time

    hub.before_page = delete_on_page_2
    state = SourceState(baselined=True, known_ids=frozenset(f"ft_{n}" for n in range(25)))
    read = await SourceReader(hub, page_size=10).read(source())
    assert isinstance(read, ListRead)
    assert "ft_14" not in read.by_id
    outcome = discover(source(), state, read, now=NOW)
    assert outcome.events == ()
    assert outcome.state.known_ids == state.known_ids  # nothing forgotten


# --- against the real simulated Hub --------------------------------------------------------------------


async def test_reading_a_real_list_that_shifts_while_being_read() -> None:
    with SimHub(token=TOKEN) as hub:
        base = time.time() - 1000
        for n in range(250):
            hub.add_fine_tune("acme", "bot", f"ft_{n:03d}", created_at=base + n)
        added: list[str] = []

        def shift(repo_key: str, page: int) -> None:
            if page == 2 and not added:
                added.append(hub.add_fine_tune("acme", "bot", "ft_late"))

        hub.on_list = shift
        async with HubClient(base_url=hub.url, token=TOKEN) as client:
            reader = SourceReader(client)
            first = await reader.read(source())
            assert isinstance(first, ListRead)
            assert (first.pages, first.complete) == (3, True)
            assert len(first.fine_tunes) == len(first.by_id) == 250
            assert first.fine_tunes[0].id == "ft_249"
            baseline = discover(source(), SourceState(), first, now=time.time())
            assert baseline.events == () and baseline.state.baselined
            assert len(baseline.watch) == 250
            second = await reader.read(source(), watched_ids=set(baseline.state.known_ids))
            assert isinstance(second, ListRead)
            outcome = discover(source(), baseline.state, second, now=time.time())
        assert [e.data["fine_tune"]["id"] for e in outcome.events] == ["ft_late"]
        (event,) = outcome.events
        assert event.data["source"] == "acme/bot"
        assert event.data["created_by"] == "simuser"
        assert event.data["status"] == "running"
        assert [r.endpoint for r in hub.requests("acme/bot")] == ["list"] * 6


async def test_a_real_list_fault_fails_the_read() -> None:
    with SimHub(token=TOKEN) as hub:
        hub.add_fine_tune("acme", "bot", "ft_1")
        hub.inject("acme/bot", Fault(status=500, endpoint="list"))
        async with HubClient(base_url=hub.url, token=TOKEN) as client:
            with pytest.raises(PollError) as info:
                await SourceReader(client).read(source())
            assert info.value.http_status == 500
            read = await SourceReader(client).read(source())
        assert isinstance(read, ListRead) and [f.id for f in read.fine_tunes] == ["ft_1"]


# --- filters ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["*"], [], ["ft_a", "ft_b", "ft_c"]),
        (["sft-*"], [], ["ft_a", "ft_b"]),
        (["ft_c"], [], ["ft_c"]),  # by id
        (["*"], ["*-old"], ["ft_a", "ft_c"]),
        (["sft-*"], ["ft_a"], ["ft_b"]),  # exclude by id wins over include by name
        (["nothing"], [], []),
    ],
)
def test_include_and_exclude_globs_on_name_or_id(include: list[str], exclude: list[str], expected: list[str]) -> None:
    entries = [ft("ft_a", name="sft-new"), ft("ft_b", name="sft-old"), ft("ft_c")]
    chosen = [e.id for e in entries if matches(source(include=include, exclude=exclude), e, now=NOW)]
    assert chosen == expected


def test_created_by_guards_against_a_hub_that_ignores_the_filter() -> None:
    alice = source(created_by="alice")
    assert matches(alice, ft("a", created_by="alice"), now=NOW)
    assert not matches(alice, ft("b", created_by="bob"), now=NOW)
    assert matches(alice, ft("c"), now=NOW)  # a list entry without the creator: the Hub filtered it


def iso(epoch_s: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


def test_max_age_days_on_finished_at_else_updated_at() -> None:
    week = source(max_age_days=7)
    assert matches(week, ft("a", status="completed", finished_at=iso(NOW - 6 * DAY)), now=NOW)
    assert not matches(week, ft("b", status="completed", finished_at=iso(NOW - 8 * DAY)), now=NOW)
    # no finished_at: updated_at decides for a terminal status
    assert not matches(week, ft("c", status="errored", updated_at=iso(NOW - 8 * DAY)), now=NOW)
    assert matches(week, ft("d", status="stopped", updated_at=iso(NOW - 1 * DAY)), now=NOW)
    # finished_at wins over updated_at
    old = ft("e", status="completed", finished_at=iso(NOW - 9 * DAY), updated_at=iso(NOW))
    assert not matches(week, old, now=NOW)
    # a run that has not finished is never too old
    assert matches(week, ft("f", status="running", updated_at=iso(NOW - 30 * DAY)), now=NOW)
    assert matches(week, ft("g", status="completed"), now=NOW)  # no time at all: kept
    assert matches(source(max_age_days=0.5), ft("h", status="completed", finished_at=iso(NOW - 3600)), now=NOW)
    assert finished_at(ft("i", status="running", updated_at=iso(NOW))) is None


# --- the decision ----------------------------------------------------------------------------------------


def read_of(*entries: HubFineTune) -> ListRead:
    return ListRead(tuple(entries), pages=1, complete=True, truncated=False)


def test_the_first_read_of_a_source_is_recorded_silently() -> None:
    outcome = discover(source(), SourceState(), read_of(ft("b"), ft("a")), now=NOW)
    assert outcome.events == ()
    assert outcome.state == SourceState(baselined=True, known_ids=frozenset({"a", "b"}))
    assert [f.id for f in outcome.new] == ["b", "a"]
    assert [f.id for f in outcome.watch] == ["b", "a"]


def test_without_baseline_the_first_read_announces_everything_oldest_first() -> None:
    outcome = discover(source(), SourceState(), read_of(ft("b"), ft("a")), now=NOW, baseline=False)
    assert [e.data["fine_tune"]["id"] for e in outcome.events] == ["a", "b"]


def test_new_fine_tunes_after_the_baseline_are_discovered_with_their_data() -> None:
    state = SourceState(baselined=True, known_ids=frozenset({"a"}))
    new = ft(
        "b",
        name="sft-2",
        status="enqueued",
        created_at="2026-12-03T09:00:00Z",
        base_model="Qwen/Qwen3-0.6B",
        created_by="alice",
    )
    outcome = discover(source(name="support"), state, read_of(new, ft("a")), now=NOW)
    (event,) = outcome.events
    assert event.type == FINE_TUNE_DISCOVERED
    assert event.data == {
        "fine_tune": {"namespace": "acme", "repo": "bot", "id": "b", "name": "sft-2"},
        "source": "support",
        "status": "enqueued",
        "created_at": "2026-12-03T09:00:00Z",
        "base_model": "Qwen/Qwen3-0.6B",
        "created_by": "alice",
    }
    assert outcome.state.known_ids == {"a", "b"}


def test_a_fine_tune_missing_from_a_read_stays_known_and_is_not_rediscovered() -> None:
    state = SourceState(baselined=True, known_ids=frozenset({"a", "b"}))
    gone = discover(source(), state, read_of(ft("a")), now=NOW)
    assert gone.events == () and gone.state.known_ids == {"a", "b"}
    back = discover(source(), gone.state, read_of(ft("b"), ft("a")), now=NOW)
    assert back.events == ()


def test_filtered_out_fine_tunes_become_known_but_are_not_announced_or_watched() -> None:
    state = SourceState(baselined=True, known_ids=frozenset())
    outcome = discover(source(exclude=["skip-*"]), state, read_of(ft("x", name="skip-me"), ft("y")), now=NOW)
    assert [e.data["fine_tune"]["id"] for e in outcome.events] == ["y"]
    assert [f.id for f in outcome.watch] == ["y"]
    assert outcome.state.known_ids == {"x", "y"}
    # widening the filter later does not announce the old one
    widened = discover(source(), outcome.state, read_of(ft("x", name="skip-me"), ft("y")), now=NOW)
    assert widened.events == () and [f.id for f in widened.watch] == ["x", "y"]


def test_an_old_finished_fine_tune_is_neither_announced_nor_watched() -> None:
    state = SourceState(baselined=True)
    stale = ft("old", status="completed", finished_at=iso(NOW - 30 * DAY))
    outcome = discover(source(), state, read_of(stale), now=NOW)
    assert outcome.events == () and outcome.watch == ()


def test_ref_of_uses_the_hubs_name_else_the_id() -> None:
    assert ref_of(source(), ft("a", name="nice")).name == "nice"
    assert ref_of(source(), ft("a")).key == "acme/bot/a"
    assert ref_of(source(), ft("a")).name == "a"
