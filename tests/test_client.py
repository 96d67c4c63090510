"""HubClient against httpx.MockTransport: auth, statuses, retries, Retry-After, budget, errors."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import stamina
from hypothesis import given, settings
from hypothesis import strategies as st

from watcher.core.models import FineTuneRef
from watcher.errors import HubUnauthorized, HubUnavailable, PollError
from watcher.hub.client import (
    MAX_BODY_BYTES,
    FetchedBody,
    FetchedDeferred,
    FetchedNotFound,
    HubClient,
    parse_retry_after,
)
from watcher.hub.gate import HubGate
from watcher.hub.transport import AiohttpTransport
from watcher.testing.simhub import SimHub

BASE_URL = "https://hub.test"
TOKEN = "secret-token"
REF = FineTuneRef(namespace="ox", repo="models", id="ft_123", name="my-ft")
PATH = "/api/repos/ox/models/fine_tunes/ft_123/checkpoints"
BODY = b'{"checkpoints": [], "status": "success", "status_message": "resource_found"}'

Step = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


@dataclass
class ScriptedHub:
    """A MockTransport handler answering with a script, recording each request and its monotonic time."""

    script: list[Step]
    repeat_last: bool = True
    requests: list[httpx.Request] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(time.monotonic())
        self.requests.append(request)
        index = len(self.requests) - 1
        if index >= len(self.script):
            assert self.repeat_last, f"unexpected request #{index + 1}: {request.method} {request.url}"
            index = len(self.script) - 1
        step = self.script[index]
        if isinstance(step, Exception):
            raise step
        if callable(step) and not isinstance(step, httpx.Response):
            return step(request)
        return step

    @property
    def count(self) -> int:
        return len(self.requests)

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


async def stream(chunks: list[bytes]) -> AsyncIterator[bytes]:
    """A body httpx reads (and decodes) only when the client reads it."""
    for chunk in chunks:
        yield chunk


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every wait the client asks asyncio.sleep for (and still waits): what it chose to wait, which the machine's
    load cannot stretch the way it stretches the time measured around it."""
    asked: list[float] = []
    sleep = asyncio.sleep

    async def recorded(delay: float, result: Any = None) -> Any:
        if delay > 0:
            asked.append(delay)
        return await sleep(delay, result)

    monkeypatch.setattr(asyncio, "sleep", recorded)
    return asked


def make_client(hub: ScriptedHub, **kwargs: object) -> HubClient:
    return HubClient(base_url=BASE_URL, token=TOKEN, transport=httpx.MockTransport(hub), **kwargs)  # type: ignore[arg-type]


async def fetch(hub: ScriptedHub, ref: FineTuneRef = REF, **kwargs: object) -> FetchedBody | FetchedNotFound:
    async with make_client(hub, **kwargs) as client:
        return await client.fetch(ref)


async def fetch_error(hub: ScriptedHub, **kwargs: object) -> PollError:
    with pytest.raises(PollError) as info:
        await fetch(hub, **kwargs)
    return info.value


# --- success and request shape ----------------------------------------------------------------------


async def test_200_returns_the_raw_body_and_sends_bearer_auth() -> None:
    hub = ScriptedHub([httpx.Response(200, content=BODY)])
    result = await fetch(hub)
    assert result == FetchedBody(BODY)
    assert hub.count == 1
    request = hub.requests[0]
    assert request.method == "GET"
    assert request.url.host == "hub.test"
    assert request.url.raw_path == PATH.encode()
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"


async def test_200_streamed_body_is_returned_whole() -> None:
    chunks = [b'{"checkpoints": [', b'{"step": 1}', b"]}"]
    hub = ScriptedHub([lambda request: httpx.Response(200, content=stream(chunks))])
    assert await fetch(hub) == FetchedBody(b"".join(chunks))


async def test_path_segments_are_percent_encoded() -> None:
    hub = ScriptedHub([httpx.Response(200, content=BODY)])
    ref = FineTuneRef(namespace="my org", repo="a/b", id="ft?1#x", name="odd")
    await fetch(hub, ref)
    assert hub.requests[0].url.raw_path == b"/api/repos/my%20org/a%2Fb/fine_tunes/ft%3F1%23x/checkpoints"


async def test_timeout_setting_reaches_the_transport() -> None:
    hub = ScriptedHub([httpx.Response(200, content=BODY)])
    await fetch(hub, timeout_s=3.5)
    timeouts = hub.requests[0].extensions["timeout"]
    assert timeouts == {"connect": 3.5, "read": 3.5, "write": 3.5, "pool": 3.5}


async def test_one_client_serves_many_polls_and_closes_its_transport() -> None:
    closed: list[bool] = []

    class Transport(httpx.MockTransport):
        async def aclose(self) -> None:
            closed.append(True)

    hub = ScriptedHub([httpx.Response(200, content=BODY)])
    async with HubClient(base_url=BASE_URL, token=TOKEN, transport=Transport(hub)) as client:
        for _ in range(3):
            assert await client.fetch(REF) == FetchedBody(BODY)
        assert closed == []
    assert hub.count == 3
    assert closed == [True]


async def test_404_is_not_found_and_not_retried() -> None:
    hub = ScriptedHub([httpx.Response(404, json={"status": "error", "status_message": "resource_not_found"})])
    assert await fetch(hub) == FetchedNotFound()
    assert hub.count == 1


# --- failures that are not retried --------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_401_403_are_unauthorized_and_not_retried(status: int) -> None:
    hub = ScriptedHub([httpx.Response(status, headers={"Retry-After": "0"}, json={"error": {}})])
    err = await fetch_error(hub)
    assert type(err) is HubUnauthorized
    assert err.outcome == "unauthorized"
    assert err.http_status == status
    assert err.retryable is False
    assert hub.count == 1


@pytest.mark.parametrize("status", [500, 400, 409, 418, 422, 501, 505, 201, 204])
async def test_other_statuses_are_plain_poll_errors_and_not_retried(status: int) -> None:
    hub = ScriptedHub([httpx.Response(status, content=b"oops")])
    err = await fetch_error(hub)
    assert type(err) is PollError
    assert err.outcome == "error"
    assert err.http_status == status
    assert hub.count == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_not_followed(status: int) -> None:
    hub = ScriptedHub(
        [httpx.Response(status, headers={"Location": f"{BASE_URL}/elsewhere"}), httpx.Response(200, content=BODY)]
    )
    err = await fetch_error(hub)
    assert type(err) is PollError
    assert err.http_status == status
    assert hub.count == 1
    assert all(request.url.path == PATH for request in hub.requests)


async def test_undecodable_body_is_a_poll_error_not_an_httpx_error() -> None:
    hub = ScriptedHub(
        [lambda request: httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=stream([b"not gzip"]))]
    )
    err = await fetch_error(hub)
    assert not isinstance(err, httpx.HTTPError)
    assert hub.count == 1


async def test_declared_body_over_the_limit_is_refused() -> None:
    hub = ScriptedHub([httpx.Response(200, headers={"Content-Length": str(MAX_BODY_BYTES + 1)}, content=b"{}")])
    err = await fetch_error(hub)
    assert type(err) is PollError
    assert hub.count == 1


async def test_the_own_transport_bounds_the_body_it_reads_and_hands_it_over_whole() -> None:
    with SimHub(token=TOKEN) as sim:
        key = sim.add_fine_tune("ox", "models", "ft_123")
        sim.add_checkpoint(key, 1, loss=0.5)
        async with HubClient(base_url=sim.url, token=TOKEN) as client:
            fetched = await client.fetch(REF)
        assert isinstance(fetched, FetchedBody) and b'"checkpoints"' in fetched.body
        size = len(fetched.body)
        small = HubClient(base_url=sim.url, token=TOKEN, transport=AiohttpTransport(max_body_bytes=size - 1))
        async with small:
            with pytest.raises(PollError, match=f"over the {size - 1} byte limit") as info:
                await small.fetch(REF)
    assert info.value.http_status == 200 and not isinstance(info.value, HubUnavailable)


# --- retries ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_retryable_statuses_are_retried_within_the_poll(status: int) -> None:
    hub = ScriptedHub([httpx.Response(status), httpx.Response(200, content=BODY)])
    assert await fetch(hub) == FetchedBody(BODY)
    assert hub.count == 2
    assert hub.gaps()[0] > 0.05  # a backoff, not a hot loop


@pytest.mark.parametrize(
    "error",
    [
        httpx.ReadTimeout("read timed out"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.PoolTimeout("pool timed out"),
        httpx.ConnectError("connection refused"),
        httpx.ReadError("connection reset"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_timeouts_and_connection_errors_are_retried(error: Exception) -> None:
    hub = ScriptedHub([error, httpx.Response(200, content=BODY)])
    assert await fetch(hub) == FetchedBody(BODY)
    assert hub.count == 2


async def test_persistent_timeouts_end_in_hub_unavailable() -> None:
    hub = ScriptedHub([httpx.ReadTimeout("read timed out")])
    err = await fetch_error(hub, attempts=2)
    assert isinstance(err, HubUnavailable)
    assert err.retryable is True
    assert err.http_status is None
    assert err.outcome == "error"
    assert hub.count == 2


async def test_persistent_503_gives_up_after_the_attempts_with_backoff(waits: list[float]) -> None:
    hub = ScriptedHub([httpx.Response(503)])
    err = await fetch_error(hub, attempts=3)
    assert isinstance(err, HubUnavailable)
    assert err.http_status == 503
    assert err.retry_after_s is None
    assert hub.count == 3
    assert all(gap > 0.05 for gap in hub.gaps())
    assert len(waits) == 2 and sum(waits) < 10.0  # a back-off before each retry, all within the retry budget


async def test_retry_after_seconds_is_honoured() -> None:
    hub = ScriptedHub([httpx.Response(429, headers={"Retry-After": "1"}), httpx.Response(200, content=BODY)])
    assert await fetch(hub) == FetchedBody(BODY)
    assert hub.count == 2
    assert hub.gaps()[0] >= 1.0 - 1e-3  # no request before Retry-After expired


async def test_retry_after_http_date_is_honoured() -> None:
    frozen = 1_700_000_000.0
    when = email.utils.formatdate(frozen + 1, usegmt=True)
    hub = ScriptedHub([httpx.Response(503, headers={"Retry-After": when}), httpx.Response(200, content=BODY)])
    assert await fetch(hub, clock=lambda: frozen) == FetchedBody(BODY)
    assert hub.count == 2
    assert hub.gaps()[0] >= 1.0 - 1e-3


async def test_retry_after_is_honoured_on_every_retry() -> None:
    hub = ScriptedHub(
        [
            httpx.Response(503, headers={"Retry-After": "1"}),
            httpx.Response(429, headers={"Retry-After": "1"}),
            httpx.Response(200, content=BODY),
        ]
    )
    assert await fetch(hub, retry_budget_s=10.0) == FetchedBody(BODY)
    assert hub.count == 3
    assert all(gap >= 1.0 - 1e-3 for gap in hub.gaps())


@pytest.mark.parametrize("header", ["30", "3600"])
async def test_retry_after_longer_than_the_budget_ends_the_poll_at_once(header: str, waits: list[float]) -> None:
    hub = ScriptedHub([httpx.Response(429, headers={"Retry-After": header}), httpx.Response(200, content=BODY)])
    started = time.monotonic()
    err = await fetch_error(hub, retry_budget_s=10.0)
    assert isinstance(err, HubUnavailable)
    assert err.http_status == 429
    assert err.retry_after_s == float(header)
    assert hub.count == 1
    assert waits == []  # at once: no wait at all, not even a short one
    assert time.monotonic() - started < 20.0  # nor one another way: far from the 30 s or more it was told


async def test_retry_after_http_date_beyond_the_budget_carries_the_wait(waits: list[float]) -> None:
    frozen = 1_700_000_000.0
    when = email.utils.formatdate(frozen + 600, usegmt=True)
    hub = ScriptedHub([httpx.Response(503, headers={"Retry-After": when})])
    started = time.monotonic()
    err = await fetch_error(hub, clock=lambda: frozen)
    assert isinstance(err, HubUnavailable)
    assert err.retry_after_s == pytest.approx(600.0)
    assert hub.count == 1
    assert waits == []
    assert time.monotonic() - started < 20.0


async def test_retry_after_longer_than_the_remaining_budget_ends_the_poll(waits: list[float]) -> None:
    # Budget 1.5 s: the first Retry-After (1 s) fits, the second (1 s, with only ~0.5 s left) does not.
    hub = ScriptedHub([httpx.Response(503, headers={"Retry-After": "1"})])
    err = await fetch_error(hub, retry_budget_s=1.5, attempts=10)
    assert isinstance(err, HubUnavailable)
    assert err.retry_after_s == 1.0
    assert hub.count == 2
    assert hub.gaps()[0] >= 1.0 - 1e-3
    assert waits == [pytest.approx(1.0, abs=0.01)]  # the first Retry-After only: it did not sleep out the second


async def test_on_retry_is_told_about_each_retry() -> None:
    calls: list[tuple[FineTuneRef, PollError, float]] = []
    hub = ScriptedHub(
        [
            httpx.Response(503, headers={"Retry-After": "0"}),
            httpx.Response(429, headers={"Retry-After": "0"}),
            httpx.Response(200, content=BODY),
        ]
    )
    result = await fetch(hub, on_retry=lambda ref, err, wait: calls.append((ref, err, wait)))
    assert result == FetchedBody(BODY)
    assert hub.count == 3
    assert [(ref, type(err), err.http_status, wait) for ref, err, wait in calls] == [
        (REF, HubUnavailable, 503, 0.0),
        (REF, HubUnavailable, 429, 0.0),
    ]


async def test_on_retry_not_called_for_errors_that_are_not_retried() -> None:
    calls: list[object] = []
    hub = ScriptedHub([httpx.Response(401)])
    await fetch_error(hub, on_retry=lambda *args: calls.append(args))
    hub2 = ScriptedHub([httpx.Response(429, headers={"Retry-After": "3600"})])
    await fetch_error(hub2, on_retry=lambda *args: calls.append(args))
    assert calls == []


async def test_on_retry_not_called_when_the_attempts_are_exhausted() -> None:
    calls: list[object] = []
    hub = ScriptedHub([httpx.Response(503, headers={"Retry-After": "0"})])
    await fetch_error(hub, attempts=2, on_retry=lambda *args: calls.append(args))
    assert hub.count == 2
    assert len(calls) == hub.count - 1


@pytest.mark.parametrize("status", [429, 500])
async def test_non_ascii_digit_retry_after_is_ignored_not_raised(status: int) -> None:
    # b"\xb2" reaches the client as "\u00b2" (superscript two): str.isdigit() but not a number for float()
    hub = ScriptedHub([httpx.Response(status, headers={"Retry-After": b"\xb2"})])
    err = await fetch_error(hub, attempts=1)
    assert err.http_status == status
    assert err.retry_after_s is None


# --- parse_retry_after ------------------------------------------------------------------------------

NOW = 784_111_777.0  # Sun, 06 Nov 1994 08:49:37 GMT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("5", 5.0),
        (" 120 ", 120.0),
        ("soon", None),
        ("-1", None),
        ("1.5", None),
        ("999999999999", 86_400.0),
        ("Sun, 06 Nov 1994 08:49:38 GMT", 1.0),
        ("Sun, 06 Nov 1994 08:51:37 GMT", 120.0),
        ("Sunday, 06-Nov-94 08:49:38 GMT", 1.0),  # obsolete RFC 850 form
        ("Sun, 06 Nov 1994 08:49:00 GMT", 0.0),  # in the past: no wait
        ("Mon, 32 Nov 1994 08:49:38 GMT", None),
        ("\u00b2", None),  # a non-ASCII "digit"
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_accepts_asctime_http_date() -> None:
    assert parse_retry_after("Sun Nov  6 08:49:38 1994", now=NOW) == 1.0


@pytest.mark.parametrize("value", ["\u00b2", "\u00b9", "1\u00b3"])
def test_parse_retry_after_ignores_non_ascii_digits(value: str) -> None:
    assert parse_retry_after(value, now=NOW) is None


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF))  # header values decode as latin-1
    | st.builds(
        lambda day, year, zone: f"Sun, {day:02d} Nov {year} 08:49:37 {zone}",
        st.integers(0, 40),
        st.integers(0, 99999),
        st.sampled_from(["GMT", "+0000", "-0000", "+1400", "UT", "XYZ", ""]),
    ),
    st.floats(0, 4e9),
)
def test_parse_retry_after_never_raises_on_junk(value: str, now: float) -> None:
    result = parse_retry_after(value, now=now)
    assert result is None or 0.0 <= result <= 86_400.0


# --- the Hub-wide gate ------------------------------------------------------------------------------------


class Mono:
    """An injected monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


OTHER = FineTuneRef(namespace="ox", repo="models", id="ft_456", name="other")


async def test_a_429_with_retry_after_holds_every_fine_tune_back_without_a_request() -> None:
    mono = Mono()
    hub = ScriptedHub([httpx.Response(429, headers={"Retry-After": "120"}), httpx.Response(200, content=BODY)])
    async with make_client(hub, gate=HubGate(clock=mono)) as client:
        with pytest.raises(HubUnavailable):
            await client.fetch(REF)
        deferred = await client.fetch(OTHER)  # another fine-tune: no request while the Hub asked to wait
        assert isinstance(deferred, FetchedDeferred) and deferred.wait_s == pytest.approx(120)
        assert hub.count == 1
        mono.now += 120
        assert await client.fetch(OTHER) == FetchedBody(BODY)  # the probe; its 200 opens the gate for all
        assert await client.fetch(REF) == FetchedBody(BODY)
        assert hub.count == 3


def test_without_retry_after_the_hub_wide_back_off_doubles_per_round_and_resets_on_an_answer() -> None:
    mono = Mono()
    gate = HubGate(clock=mono, base_backoff_s=1.0, max_backoff_s=8.0)
    waits = []
    for _ in range(5):
        assert gate.admit()
        waits.append(gate.on_throttle(None))
        assert gate.on_throttle(None) == pytest.approx(waits[-1])  # the same round (requests in flight together)
        assert not gate.admit()
        mono.now += waits[-1]
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert gate.admit() and not gate.admit()  # one probe at a time
    gate.on_answer()
    assert not gate.throttled and gate.admit() and gate.admit()


def test_quick_retries_share_one_budget_across_the_hub() -> None:
    mono = Mono()
    gate = HubGate(clock=mono, retry_capacity=3, retry_refill_per_s=0.5)
    assert [gate.take_retry() for _ in range(5)] == [True, True, True, False, False]
    mono.now += 2.0
    assert gate.take_retry() and not gate.take_retry()


async def test_a_503_storm_retries_draw_on_the_shared_budget() -> None:
    hub = ScriptedHub([httpx.Response(503)])
    gate = HubGate(retry_capacity=2, retry_refill_per_s=0.0)
    async with make_client(hub, gate=gate, attempts=4) as client:
        for ref in (REF, OTHER, REF):
            with pytest.raises(HubUnavailable):
                await client.fetch(ref)
    assert hub.count == 3 + 2  # one request per poll, plus the two retries the Hub-wide budget allowed


# --- one request path ---------------------------------------------------------------------------------


async def test_an_action_post_takes_the_same_path_with_its_json_body() -> None:
    # the path the Hub actions (deploy a checkpoint, stop a run) will take: retries, counting, error mapping
    hub = ScriptedHub([httpx.Response(503), httpx.Response(200, content=b'{"status": "success"}')])
    counted: list[tuple[str, str]] = []
    path = "/api/repos/ox/models/fine_tunes/ft_123/actions/stop"
    async with make_client(hub, on_request=lambda endpoint, outcome: counted.append((endpoint, outcome))) as client:
        body = await client._request("POST", path, json={"deployment_type": "fast"}, endpoint="stop", ref=REF)
    assert body == b'{"status": "success"}'
    assert [(r.method, r.url.path, r.content) for r in hub.requests] == [
        ("POST", path, b'{"deployment_type":"fast"}'),
        ("POST", path, b'{"deployment_type":"fast"}'),
    ]
    assert hub.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert counted == [("stop", "error"), ("stop", "ok")]


async def test_building_and_using_a_client_leaves_staminas_process_wide_hooks_alone() -> None:
    told: list[object] = []
    stamina.instrumentation.set_on_retry_hooks([told.append])
    try:
        hub = ScriptedHub([httpx.Response(503), httpx.Response(200, content=BODY)])
        assert await fetch(hub) == FetchedBody(BODY)
        assert stamina.instrumentation.get_on_retry_hooks() == (told.append,)
        assert len(told) == 1  # the retry ran through stamina, which told the process's own hook
    finally:
        stamina.instrumentation.set_on_retry_hooks(None)
