"""The Hub HTTP client: one pooled httpx.AsyncClient, one request path (error mapping and stamina retries) for every
Hub call, errors wrapped here."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from urllib.parse import quote

import httpx
import stamina

from watcher.core.models import FetchedNotFound, FineTuneRef, HubFineTune
from watcher.errors import HubUnauthorized, HubUnavailable, PollError
from watcher.hub.gate import HubGate
from watcher.hub.schema import parse_fine_tune, parse_fine_tune_list
from watcher.hub.transport import AiohttpTransport, BodyTooLarge, ReadBody

__all__ = [
    "MAX_BODY_BYTES",
    "FetchedBody",
    "FetchedDeferred",
    "FetchedNotFound",
    "HubClient",
    "checkpoints_path",
    "parse_retry_after",
]

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
MAX_RETRY_AFTER_S = 86_400.0
MAX_BODY_BYTES = 256 * 1024 * 1024
USER_AGENT = "oxen-watcher"


@dataclass(frozen=True, slots=True)
class FetchedBody:
    """A 200 answer: the raw body, parsed later only if it differs from the last one."""

    body: bytes


@dataclass(frozen=True, slots=True)
class FetchedDeferred:
    """No request was made: the Hub asked every poll to wait (a 429 or Retry-After), for about wait_s more."""

    wait_s: float


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Retry-After in seconds from now (delta-seconds or HTTP-date), or None when absent or malformed."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # the asctime form carries no zone; HTTP dates are UTC
        when = when.replace(tzinfo=UTC)
    return min(max(when.timestamp() - now, 0.0), MAX_RETRY_AFTER_S)


def checkpoints_path(ref: FineTuneRef) -> str:
    """The endpoint's path for one fine-tune."""
    parts = (quote(part, safe="") for part in (ref.namespace, ref.repo, ref.id))
    namespace, repo, fine_tune_id = parts
    return f"/api/repos/{namespace}/{repo}/fine_tunes/{fine_tune_id}/checkpoints"


class _Retries:
    """One call's quick retries after its first attempt failed: stamina's back-off hook and attempt, with state."""

    __slots__ = ("_client", "_held", "_pending", "_ref", "_started", "_tries", "last_error")

    def __init__(self, client: HubClient, ref: FineTuneRef, first_error: HubUnavailable, *, started: float) -> None:
        self._client = client
        self._ref = ref
        self._started = started
        self._tries = 0
        self._held = False
        self._pending: HubUnavailable | None = first_error
        self.last_error = first_error

    def decide(self, exc: Exception) -> bool | float:
        """False to give up (stamina re-raises exc), True for stamina's exponential back-off, or seconds to wait."""
        self._tries += 1
        client = self._client
        if not isinstance(exc, HubUnavailable) or self._held or self._tries >= client._attempts:
            return False
        self.last_error = exc
        remaining = client._retry_budget_s - (time.monotonic() - self._started)
        wait = exc.retry_after_s
        gate = client.gate
        gate_wait = gate.wait_s()
        if gate_wait > 0:  # the Hub-wide back-off binds every retry too
            wait = max(wait or 0.0, gate_wait)
        # take_retry last: the Hub-wide budget of quick retries is spent only on a retry that happens
        if remaining <= 0 or (wait is not None and wait > remaining) or not gate.take_retry():
            return False
        if client._on_retry is not None:
            client._on_retry(self._ref, exc, wait if wait is not None else 0.0)
        return wait if wait is not None else True

    async def attempt(self, request: httpx.Request, endpoint: str) -> bytes | FetchedNotFound:
        """One attempt under stamina; the first one replays the failure of the call's bare first attempt."""
        pending = self._pending
        if pending is not None:
            # the first attempt ran before stamina was set up (almost every call succeeds at once, and setting up
            # a retry loop costs as much as the rest of a poll): stamina judges its failure like any other
            self._pending = None
            raise pending
        if not self._client.gate.admit():  # another call probes the Hub meanwhile: this one ends as it stood
            self._held = True
            raise self.last_error
        return await self._client._attempt(request, endpoint)


class HubClient:
    """Every Hub call through one path; raises PollError subclasses, never third-party errors.

    `_request` (any method, path and JSON body) is the path: the Hub-wide gate, a bare first attempt, then quick
    retries of transient failures by stamina within the retry budget, and one mapping of answers and transport
    failures to results and errors. fetch() (checkpoints) uses it with a request built once per fine-tune.
    """

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        timeout_s: float = 15.0,
        max_concurrency: int = 8,
        retry_budget_s: float = 10.0,
        attempts: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        on_retry: Callable[[FineTuneRef, PollError, float], None] | None = None,
        on_request: Callable[[str, str], None] | None = None,
        gate: HubGate | None = None,
    ) -> None:
        self._retry_budget_s = retry_budget_s
        self._attempts = attempts
        self._clock = clock
        self._on_retry = on_retry
        # called once per HTTP attempt with (endpoint, outcome): endpoint in checkpoints, list, fine_tune; outcome
        # in ok, not_found, unauthorized, error (the daemon passes Metrics.observe_hub_request)
        self._on_request = on_request
        self.gate = gate or HubGate()
        # This client's retry settings; stamina's process-wide instrumentation is left alone (the watcher logs
        # retries itself, through on_retry). The budget and the attempts are enforced by _Retries.decide, which
        # must see every stop first so that on_retry is told only of retries that happen: no stamina timeout.
        self._retrying = stamina.AsyncRetryingCaller(
            attempts=attempts, timeout=None, wait_initial=0.2, wait_max=2.0, wait_jitter=0.3
        )
        if transport is None:
            # aiohttp's HTTP/1.1 engine behind httpx's API: about a third of the CPU per request of httpx's
            # default transport (see bench/), which decides what a poll costs
            transport = AiohttpTransport(max_body_bytes=MAX_BODY_BYTES)
        self._transport = transport
        # bounds requests in flight, not polls: a poll waiting out a backoff holds no slot
        self._slots = asyncio.Semaphore(max_concurrency)
        self._requests: dict[str, httpx.Request] = {}
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json", "User-Agent": USER_AGENT},
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            transport=transport,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- the endpoints -----------------------------------------------------------------------------------------

    async def fetch(self, ref: FineTuneRef) -> FetchedBody | FetchedNotFound | FetchedDeferred:
        """One poll: the 200 body or a 404, after quick retries of transient failures within the budget.

        A Retry-After longer than what is left of the budget ends the poll at once with HubUnavailable
        carrying `retry_after_s`, so the caller can hold the next poll back until then. While the Hub-wide
        gate is closed (a recent 429 or Retry-After), no request is made: FetchedDeferred.
        """
        answer = await self._send(self._request_for(ref), endpoint="checkpoints", ref=ref)
        return FetchedBody(answer) if isinstance(answer, bytes) else answer

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
        """One page (1-based) of a repository's fine-tunes, newest first; FetchedNotFound when the Hub says 404."""
        params: dict[str, str | int] = {"page": page, "page_size": page_size, "sort": "newest"}
        if created_by:
            params["created_by"] = created_by
        if status:
            params["status"] = status
        path = f"/api/repos/{quote(namespace, safe='')}/{quote(repo, safe='')}/fine_tunes"
        ref = FineTuneRef(namespace=namespace, repo=repo, id="", name=f"{namespace}/{repo}")
        body = await self._request("GET", path, params=params, endpoint="list", ref=ref)
        return body if isinstance(body, FetchedNotFound) else parse_fine_tune_list(body)

    async def get_fine_tune(self, namespace: str, repo: str, fine_tune_id: str) -> HubFineTune | FetchedNotFound:
        """One fine-tune's current object (status, error, times); FetchedNotFound when the Hub says 404."""
        parts = (quote(part, safe="") for part in (namespace, repo, fine_tune_id))
        path = "/api/repos/{}/{}/fine_tunes/{}".format(*parts)
        ref = FineTuneRef(namespace=namespace, repo=repo, id=fine_tune_id, name=fine_tune_id)
        body = await self._request("GET", path, endpoint="fine_tune", ref=ref)
        return body if isinstance(body, FetchedNotFound) else parse_fine_tune(body)

    # --- the one request path ----------------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        ref: FineTuneRef,
        params: dict[str, str | int] | None = None,
        json: object = None,
    ) -> bytes | FetchedNotFound:
        """Any Hub call (a read, or an action's POST with a JSON body): the 200 body or a 404.

        `endpoint` labels the call in on_request; `ref` names it to on_retry. While the Hub-wide gate is closed,
        no request is made: HubUnavailable ("held back") carrying the wait.
        """
        request = self._http.build_request(method, path, params=params, json=json)
        answer = await self._send(request, endpoint=endpoint, ref=ref)
        if isinstance(answer, FetchedDeferred):
            raise HubUnavailable("held back: the Hub asked to slow down", retry_after_s=answer.wait_s)
        return answer

    async def _send(
        self, request: httpx.Request, *, endpoint: str, ref: FineTuneRef
    ) -> bytes | FetchedNotFound | FetchedDeferred:
        gate = self.gate
        # the Hub-wide back-off holds every endpoint: no request while it is closed
        if not gate.admit():
            return FetchedDeferred(gate.wait_s())
        started = time.monotonic()
        try:
            return await self._attempt(request, endpoint)
        except HubUnavailable as err:
            retries = _Retries(self, ref, err, started=started)
        return await self._retrying(retries.decide, retries.attempt, request, endpoint)

    def _request_for(self, ref: FineTuneRef) -> httpx.Request:
        # Built once per fine-tune: URL parsing and header merging cost more than the rest of a poll.
        request = self._requests.get(ref.key)
        if request is None:
            request = self._requests[ref.key] = self._http.build_request("GET", checkpoints_path(ref))
        return request

    async def _attempt(self, request: httpx.Request, endpoint: str) -> bytes | FetchedNotFound:
        """One HTTP attempt, its answer or failure mapped: bytes (200), FetchedNotFound (404) or a PollError."""
        outcome = "error"
        try:
            try:
                # Straight to the transport: a request of ours needs none of the client's redirect, auth or
                # cookie handling (redirects are never followed, and the Hub sets no cookies we want).
                async with self._slots:
                    response = await self._transport.handle_async_request(request)
                try:
                    status = response.status_code
                    if status == 200:
                        self.gate.on_answer()
                        body = await self._read_capped(response)
                        outcome = "ok"
                        return body
                    await response.aread()
                finally:
                    await response.aclose()
            except BodyTooLarge as err:
                raise PollError(str(err), http_status=200) from err
            except httpx.TimeoutException as err:
                self.gate.release_probe()  # no answer says nothing about throttling: the next call may probe
                raise HubUnavailable(f"timed out ({type(err).__name__})") from err
            except httpx.TransportError as err:
                self.gate.release_probe()
                raise HubUnavailable(f"connection failed ({type(err).__name__})") from err
            except asyncio.CancelledError:
                self.gate.release_probe()
                outcome = ""
                raise
            except httpx.HTTPError as err:  # decoding and protocol errors outside TransportError
                raise PollError(f"HTTP error ({type(err).__name__})") from err
            retry_after = parse_retry_after(response.headers.get("Retry-After"), now=self._clock())
            if status == 429 or (retry_after is not None and status in RETRYABLE_STATUSES):
                self.gate.on_throttle(retry_after)
            else:
                self.gate.on_answer()
            if status == 404:
                outcome = "not_found"
                return FetchedNotFound()
            if status in RETRYABLE_STATUSES:
                raise HubUnavailable(f"Hub answered {status}", http_status=status, retry_after_s=retry_after)
            if status in (401, 403):
                outcome = "unauthorized"
                raise HubUnauthorized(f"Hub refused the token ({status})", http_status=status)
            raise PollError(f"Hub answered {status}", http_status=status, retry_after_s=retry_after)
        finally:
            if self._on_request is not None and outcome:
                self._on_request(endpoint, outcome)

    @staticmethod
    async def _read_capped(response: httpx.Response) -> bytes:
        stream = response.stream
        if isinstance(stream, ReadBody):  # read whole (and bounded) by the own transport
            return stream.body
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise PollError(f"body of {declared} bytes is over the {MAX_BODY_BYTES} byte limit", http_status=200)
        if isinstance(stream, httpx.ByteStream):  # already read (a MockTransport's content=)
            return response.content
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise PollError(f"body is over the {MAX_BODY_BYTES} byte limit", http_status=200)
            chunks.append(chunk)
        return b"".join(chunks)
