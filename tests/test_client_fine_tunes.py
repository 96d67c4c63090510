"""HubClient.list_fine_tunes / get_fine_tune: request shape, validation, and errors wrapped like the checkpoint
poll (httpx MockTransport), then against the real simulated Hub."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from watcher.core.models import FineTuneRef, HubFineTune
from watcher.errors import HubUnauthorized, HubUnavailable, InvalidResponse, PollError
from watcher.hub.client import FetchedNotFound, HubClient
from watcher.hub.schema import parse_fine_tune, parse_fine_tune_list, parse_time
from watcher.testing.simhub import Fault, SimHub

BASE_URL = "https://hub.test"
TOKEN = "secret-token"
FULL = {
    "id": "ft_1",
    "name": "sft",
    "display_name": "SFT",
    "status": "errored",
    "error": "CUDA out of memory",
    "base_model": "Qwen/Qwen3-0.6B",
    "created_by": {"id": "u1", "name": "Alice", "username": "alice", "image": None},
    "created_at": "2026-12-01T10:00:00Z",
    "updated_at": "2026-12-01T11:00:00Z",
    "started_at": "2026-12-01T10:05:00Z",
    "finished_at": "2026-12-01T11:00:00Z",
    "training_params": {"epochs": 1},
}


def body(document: dict[str, Any]) -> bytes:
    return orjson.dumps({"status": "success", "status_message": "resource_found", **document})


class Recorder:
    """A MockTransport handler answering from a list of responses (the last one repeats)."""

    def __init__(self, *answers: httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):
            return answer
        return answer(request)


def client_for(recorder: Recorder, **kwargs: Any) -> HubClient:
    return HubClient(base_url=BASE_URL, token=TOKEN, transport=httpx.MockTransport(recorder), **kwargs)


# --- request shape and parsing ---------------------------------------------------------------------------


async def test_list_sends_paging_sort_filters_and_bearer_auth() -> None:
    hub = Recorder(httpx.Response(200, content=body({"fine_tunes": [FULL, {"id": "ft_0"}]})))
    async with client_for(hub) as client:
        page = await client.list_fine_tunes(
            "my org", "bot", page=2, page_size=100, created_by="alice", status="running"
        )
    (request,) = hub.requests
    assert request.url.raw_path.split(b"?")[0] == b"/api/repos/my%20org/bot/fine_tunes"
    assert dict(request.url.params) == {
        "page": "2",
        "page_size": "100",
        "sort": "newest",
        "created_by": "alice",
        "status": "running",
    }
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert isinstance(page, tuple)
    first, second = page
    assert (first.id, first.status, first.error, first.created_by) == ("ft_1", "errored", "CUDA out of memory", "alice")
    assert first.raw["training_params"] == {"epochs": 1}
    assert second == HubFineTune(id="ft_0", raw={"id": "ft_0"})


async def test_list_leaves_out_empty_filters() -> None:
    hub = Recorder(httpx.Response(200, content=body({"fine_tunes": []})))
    async with client_for(hub) as client:
        assert await client.list_fine_tunes("acme", "bot", page=1, page_size=10) == ()
    assert dict(hub.requests[0].url.params) == {"page": "1", "page_size": "10", "sort": "newest"}


async def test_get_fine_tune() -> None:
    hub = Recorder(httpx.Response(200, content=body({"fine_tune": FULL})))
    async with client_for(hub) as client:
        fine_tune = await client.get_fine_tune("acme", "bot", "ft/1")
    assert hub.requests[0].url.raw_path == b"/api/repos/acme/bot/fine_tunes/ft%2F1"
    assert isinstance(fine_tune, HubFineTune)
    assert (fine_tune.started_at, fine_tune.finished_at) == ("2026-12-01T10:05:00Z", "2026-12-01T11:00:00Z")


@pytest.mark.parametrize("call", ["list", "get"])
async def test_404_is_not_found_and_not_retried(call: str) -> None:
    hub = Recorder(httpx.Response(404, json={"error": {"type": "resource_not_found"}}))
    async with client_for(hub) as client:
        result = await (
            client.list_fine_tunes("acme", "bot", page=1, page_size=100)
            if call == "list"
            else client.get_fine_tune("acme", "bot", "ft_1")
        )
    assert isinstance(result, FetchedNotFound)
    assert len(hub.requests) == 1


# --- errors, wrapped like the checkpoint poll ------------------------------------------------------------


async def get(hub: Recorder, **kwargs: Any) -> HubFineTune | FetchedNotFound:
    async with client_for(hub, **kwargs) as client:
        return await client.get_fine_tune("acme", "bot", "ft_1")


async def get_error(hub: Recorder, **kwargs: Any) -> PollError:
    with pytest.raises(PollError) as info:
        await get(hub, **kwargs)
    return info.value


@pytest.mark.parametrize("status", [401, 403])
async def test_401_403_are_unauthorized_and_not_retried(status: int) -> None:
    hub = Recorder(httpx.Response(status))
    error = await get_error(hub)
    assert isinstance(error, HubUnauthorized)
    assert (error.outcome, error.http_status, len(hub.requests)) == ("unauthorized", status, 1)


@pytest.mark.parametrize("status", [400, 409, 500])
async def test_other_statuses_are_poll_errors_and_not_retried(status: int) -> None:
    hub = Recorder(httpx.Response(status))
    error = await get_error(hub)
    assert type(error) is PollError
    assert (error.outcome, error.http_status, len(hub.requests)) == ("error", status, 1)


@pytest.mark.parametrize("status", [301, 302, 307])
async def test_redirects_are_not_followed(status: int) -> None:
    hub = Recorder(httpx.Response(status, headers={"Location": "https://elsewhere.test/"}))
    error = await get_error(hub)
    assert error.http_status == status and len(hub.requests) == 1


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_retryable_statuses_are_retried_within_the_call(status: int) -> None:
    hub = Recorder(httpx.Response(status), httpx.Response(200, content=body({"fine_tune": FULL})))
    assert isinstance(await get(hub), HubFineTune)
    assert len(hub.requests) == 2


async def test_timeouts_and_connection_errors_are_retried_then_wrapped() -> None:
    hub = Recorder(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"))
    error = await get_error(hub, attempts=2)
    assert isinstance(error, HubUnavailable)
    assert "timed out" in error.message
    assert len(hub.requests) == 2


async def test_persistent_503_gives_up_after_the_attempts() -> None:
    hub = Recorder(httpx.Response(503))
    error = await get_error(hub, attempts=3)
    assert isinstance(error, HubUnavailable) and error.http_status == 503
    assert len(hub.requests) == 3


async def test_retry_after_is_honoured_and_one_beyond_the_budget_ends_the_call_at_once() -> None:
    hub = Recorder(
        httpx.Response(429, headers={"Retry-After": "1"}), httpx.Response(200, content=body({"fine_tune": FULL}))
    )
    started = time.monotonic()
    assert isinstance(await get(hub), HubFineTune)
    assert time.monotonic() - started >= 0.95
    long = Recorder(httpx.Response(503, headers={"Retry-After": "120"}))
    error = await get_error(long, retry_budget_s=10)
    assert isinstance(error, HubUnavailable) and error.retry_after_s == 120
    assert len(long.requests) == 1


async def test_on_retry_is_told_with_a_fine_tune_ref() -> None:
    told: list[tuple[FineTuneRef, int | None]] = []
    hub = Recorder(httpx.Response(502), httpx.Response(200, content=body({"fine_tune": FULL})))
    await get(hub, on_retry=lambda ref, err, wait: told.append((ref, err.http_status)))
    assert told == [(FineTuneRef("acme", "bot", "ft_1", "ft_1"), 502)]


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (b"<html>oops</html>", "not JSON"),
        (b"[]", "not a JSON object"),
        (body({}), "fine_tune"),
        (body({"fine_tune": {"name": "no id"}}), "fine_tune.id"),
        (body({"fine_tune": {"id": 123}}), "fine_tune.id"),
        (body({"fine_tune": {"id": ""}}), "fine_tune.id"),
        (body({"fine_tune": {"id": "a", "status": 3}}), "fine_tune.status"),
    ],
)
async def test_bodies_that_break_the_schema_are_invalid_responses(content: bytes, where: str) -> None:
    error = await get_error(Recorder(httpx.Response(200, content=content)))
    assert isinstance(error, InvalidResponse)
    assert where in error.message
    assert error.http_status == 200


async def test_a_list_entry_without_an_id_breaks_the_page() -> None:
    hub = Recorder(httpx.Response(200, content=body({"fine_tunes": [FULL, {"name": "x"}]})))
    async with client_for(hub) as client:
        with pytest.raises(InvalidResponse, match=r"fine_tunes\.1\.id"):
            await client.list_fine_tunes("acme", "bot", page=1, page_size=100)


async def test_on_request_counts_every_attempt_by_endpoint_and_outcome() -> None:
    seen: list[tuple[str, str]] = []
    hub = Recorder(
        httpx.Response(503),
        httpx.Response(200, content=body({"fine_tune": FULL})),
        httpx.Response(404),
        httpx.Response(401),
    )
    async with client_for(hub, on_request=lambda endpoint, outcome: seen.append((endpoint, outcome))) as client:
        await client.get_fine_tune("acme", "bot", "ft_1")
        await client.list_fine_tunes("acme", "bot", page=1, page_size=100)
        with pytest.raises(HubUnauthorized):
            await client.get_fine_tune("acme", "bot", "ft_1")
    assert seen == [("fine_tune", "error"), ("fine_tune", "ok"), ("list", "not_found"), ("fine_tune", "unauthorized")]


# --- the schema ------------------------------------------------------------------------------------------


def test_tolerant_of_nulls_extra_keys_and_unknown_statuses() -> None:
    raw = dict.fromkeys(FULL) | {"id": "ft_1", "status": "Paused_By_Admin", "brand_new_field": {"x": 1}}
    fine_tune = parse_fine_tune(body({"fine_tune": raw, "extra": True}))
    assert fine_tune.status == "Paused_By_Admin"
    assert (fine_tune.name, fine_tune.error, fine_tune.created_by, fine_tune.started_at) == (None, None, None, None)
    assert fine_tune.raw["brand_new_field"] == {"x": 1}


@pytest.mark.parametrize(
    ("error", "text"),
    [
        ("boom", "boom"),
        ("", None),
        ({"message": "OOM"}, "OOM"),
        ({"title": "Bad data"}, "Bad data"),
        ({"code": 7}, '{"code":7}'),
        ({}, None),
        (None, None),
    ],
)
def test_error_text_from_a_string_or_an_object(error: Any, text: str | None) -> None:
    assert parse_fine_tune(body({"fine_tune": {"id": "a", "error": error}})).error == text


@pytest.mark.parametrize(
    ("created_by", "username"),
    [({"username": "bob", "id": 1}, "bob"), ({"username": None}, None), ({}, None), ("carol", "carol"), (None, None)],
)
def test_created_by_username(created_by: Any, username: str | None) -> None:
    assert parse_fine_tune_list(body({"fine_tunes": [{"id": "a", "created_by": created_by}]}))[0].created_by == username


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-12-01T10:00:00Z", 1796119200.0),
        ("2026-12-01T10:00:00", 1796119200.0),  # no zone: UTC (Phoenix NaiveDateTime)
        ("2026-12-01T10:00:00.500000Z", 1796119200.5),
        ("2026-12-01T11:00:00+01:00", 1796119200.0),
        ("yesterday", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_time(value: str | None, expected: float | None) -> None:
    assert parse_time(value) == expected


# --- against the real simulated Hub ----------------------------------------------------------------------


async def test_against_the_simulated_hub() -> None:
    with SimHub(token="simhub-token") as hub:
        key = hub.add_fine_tune("acme", "bot", "ft_1", name="sft", status="created", created_by="alice")
        hub.add_fine_tune("acme", "bot", "ft_2", created_at=time.time() + 1)
        hub.script_run(key, step_s=0, run_s=0, outcome="errored", error="NaN loss")
        async with HubClient(base_url=hub.url, token="simhub-token") as client:
            page = await client.list_fine_tunes("acme", "bot", page=1, page_size=100)
            assert isinstance(page, tuple)
            assert [f.id for f in page] == ["ft_2", "ft_1"]
            fine_tune = await client.get_fine_tune("acme", "bot", "ft_1")
            assert isinstance(fine_tune, HubFineTune)
            assert (fine_tune.status, fine_tune.error, fine_tune.created_by) == ("errored", "NaN loss", "alice")
            assert fine_tune.started_at is not None and fine_tune.finished_at is not None
            assert isinstance(await client.get_fine_tune("acme", "bot", "nope"), FetchedNotFound)
            hub.inject(key, Fault(status=503, endpoint="fine_tune"), Fault(status=500, endpoint="fine_tune"))
            with pytest.raises(PollError) as info:
                await client.get_fine_tune("acme", "bot", "ft_1")
            assert info.value.http_status == 500  # the 503 was retried, the 500 was not
            hub.inject("acme/bot", Fault(status=200, body=b"{not json", endpoint="list"))
            with pytest.raises(InvalidResponse):
                await client.list_fine_tunes("acme", "bot", page=1, page_size=100)
        assert [r.status for r in hub.requests(key, endpoint="fine_tune")] == [200, 503, 500]


async def test_a_wrong_token_is_unauthorized_on_the_simulated_hub() -> None:
    with SimHub(token="simhub-token") as hub:
        hub.add_fine_tune("acme", "bot", "ft_1")
        async with HubClient(base_url=hub.url, token="wrong") as client:
            with pytest.raises(HubUnauthorized):
                await client.list_fine_tunes("acme", "bot", page=1, page_size=100)


# --- the Hub-wide gate and request counts (issue 9 wiring) ----------------------------------------------


async def test_a_429_on_the_list_closes_the_gate_for_every_endpoint_and_every_request_is_counted() -> None:
    hub = Recorder(
        httpx.Response(429, headers={"Retry-After": "30"}),
        httpx.Response(200, content=body({"fine_tunes": []})),
    )
    counted: list[tuple[str, str]] = []
    on_request = lambda endpoint, outcome: counted.append((endpoint, outcome))
    async with client_for(hub, retry_budget_s=1, on_request=on_request) as client:
        with pytest.raises(HubUnavailable):
            await client.list_fine_tunes("acme", "bot", page=1, page_size=100)
        assert client.gate.throttled
        with pytest.raises(HubUnavailable, match="held back"):
            await client.get_fine_tune("acme", "bot", "ft_1")
        deferred = await client.fetch(FineTuneRef("acme", "bot", "ft_1", "ft_1"))
    assert len(hub.requests) == 1  # nothing reached the Hub while the gate was closed
    assert type(deferred).__name__ == "FetchedDeferred"
    assert counted == [("list", "error")]


async def test_checkpoint_polls_are_counted_by_outcome() -> None:
    hub = Recorder(httpx.Response(200, content=b'{"checkpoints": []}'), httpx.Response(404))
    counted: list[tuple[str, str]] = []
    async with client_for(hub, on_request=lambda endpoint, outcome: counted.append((endpoint, outcome))) as client:
        ref = FineTuneRef("acme", "bot", "ft_1", "ft_1")
        await client.fetch(ref)
        await client.fetch(ref)
    assert counted == [("checkpoints", "ok"), ("checkpoints", "not_found")]
