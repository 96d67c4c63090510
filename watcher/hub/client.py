"""The Hub HTTP client: one pooled httpx.AsyncClient, short retries inside a poll, errors wrapped here."""

from __future__ import annotations

import asyncio
import email.utils
import random
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
from watcher.hub.transport import AiohttpTransport, BodyTooLarge

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
MAX_RETRY_AFTER_S = 86_400.0
MAX_BODY_BYTES = 256 * 1024 * 1024
USER_AGENT = "oxen-watcher"
__all__ = ["FetchedBody", "FetchedDeferred", "FetchedNotFound", "HubClient", "checkpoints_path", "parse_retry_after"]


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


class HubClient:
    """Fetches a fine-tune's checkpoint list; raises PollError subclasses, never third-party errors."""

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
        gate: HubGate | None = None,
    ) -> None:
        # stamina's default instrumentation logs and counts into global state; the watcher logs retries itself
        stamina.instrumentation.set_on_retry_hooks([])
        self._retry_budget_s = retry_budget_s
        self._attempts = attempts
        self._clock = clock
        self._on_retry = on_retry
        self.gate = gate or HubGate()
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

    async def fetch(self, ref: FineTuneRef) -> FetchedBody | FetchedNotFound | FetchedDeferred:
        """One poll: the 200 body or a 404, after quick retries of transient failures within the budget.

        A Retry-After longer than what is left of the budget ends the poll at once with HubUnavailable
        carrying `retry_after_s`, so the caller can hold the next poll back until then. While the Hub-wide
        gate is closed (a recent 429 or Retry-After), no request is made: FetchedDeferred.
        """
        gate = self.gate
        if not gate.admit():
            return FetchedDeferred(gate.wait_s())
        started = time.monotonic()
        # The first attempt runs bare: setting up a retry loop costs as much as the rest of a poll, and almost
        # every poll succeeds at once.
        try:
            return await self._fetch_once(ref)
        except HubUnavailable as err:
            first_error = err
        tries = 0
        last_error = first_error

        def backoff(exc: Exception) -> bool | float:
            nonlocal tries, last_error
            tries += 1
            if not isinstance(exc, HubUnavailable) or tries >= self._attempts:
                return False
            last_error = exc
            remaining = self._retry_budget_s - (time.monotonic() - started)
            wait = exc.retry_after_s
            gate_wait = gate.wait_s()
            if gate_wait > 0:  # the Hub-wide back-off binds every retry too
                wait = max(wait or 0.0, gate_wait)
            if wait is not None and wait > remaining:
                return False
            if remaining <= 0 or not gate.take_retry():  # one budget of quick retries across the Hub
                return False
            if self._on_retry is not None:
                self._on_retry(ref, exc, wait if wait is not None else 0.0)
            return wait if wait is not None else True

        first_wait = backoff(first_error)
        if first_wait is False:
            raise first_error
        await asyncio.sleep(first_wait if not isinstance(first_wait, bool) else 0.2 + random.uniform(0, 0.3))
        async for attempt in stamina.retry_context(
            on=backoff,
            attempts=self._attempts - 1,
            timeout=max(0.001, self._retry_budget_s - (time.monotonic() - started)),
            wait_initial=0.4,
            wait_max=2.0,
            wait_jitter=0.3,
        ):
            with attempt:
                if not gate.admit():  # another poll probes the Hub meanwhile: this one ends as it stood
                    raise last_error
                return await self._fetch_once(ref)
        raise AssertionError("unreachable: stamina re-raises the last error")  # pragma: no cover

    def _request_for(self, ref: FineTuneRef) -> httpx.Request:
        # Built once per fine-tune: URL parsing and header merging cost more than the rest of a poll.
        request = self._requests.get(ref.key)
        if request is None:
            request = self._requests[ref.key] = self._http.build_request("GET", checkpoints_path(ref))
        return request

    async def _fetch_once(self, ref: FineTuneRef) -> FetchedBody | FetchedNotFound:
        outcome = "error"
        try:
            fetched = await self._fetch_answer(ref)
            outcome = "ok" if isinstance(fetched, FetchedBody) else "not_found"
            return fetched
        except HubUnauthorized:
            outcome = "unauthorized"
            raise
        except asyncio.CancelledError:
            outcome = ""
            raise
        finally:
            if self.on_request is not None and outcome:
                self.on_request("checkpoints", outcome)

    async def _fetch_answer(self, ref: FineTuneRef) -> FetchedBody | FetchedNotFound:
        try:
            # Straight to the transport: a bodiless GET needs none of the client's redirect, auth or cookie
            # handling (redirects are never followed, and the Hub sets no cookies we want).
            async with self._slots:
                response = await self._transport.handle_async_request(self._request_for(ref))
            try:
                status = response.status_code
                if status == 200:
                    self.gate.on_answer()
                    return FetchedBody(await self._read_capped(response))
                await response.aread()
            finally:
                await response.aclose()
        except BodyTooLarge as err:
            raise PollError(str(err), http_status=200) from err
        except httpx.TimeoutException as err:
            self.gate.release_probe()  # no answer says nothing about throttling: the next poll may probe
            raise HubUnavailable(f"timed out ({type(err).__name__})") from err
        except httpx.TransportError as err:
            self.gate.release_probe()
            raise HubUnavailable(f"connection failed ({type(err).__name__})") from err
        except asyncio.CancelledError:
            self.gate.release_probe()
            raise
        except httpx.HTTPError as err:  # decoding and protocol errors outside TransportError
            raise PollError(f"HTTP error ({type(err).__name__})") from err
        return self._answer(status, response)

    def _answer(self, status: int, response: httpx.Response) -> FetchedNotFound:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now=self._clock())
        if status == 429 or (retry_after is not None and status in RETRYABLE_STATUSES):
            self.gate.on_throttle(retry_after)
        else:
            self.gate.on_answer()
        if status == 404:
            return FetchedNotFound()
        if status in RETRYABLE_STATUSES:
            raise HubUnavailable(f"Hub answered {status}", http_status=status, retry_after_s=retry_after)
        if status in (401, 403):
            raise HubUnauthorized(f"Hub refused the token ({status})", http_status=status)
        raise PollError(f"Hub answered {status}", http_status=status, retry_after_s=retry_after)

    @staticmethod
    async def _read_capped(response: httpx.Response) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise PollError(f"body of {declared} bytes is over the {MAX_BODY_BYTES} byte limit", http_status=200)
        if isinstance(response.stream, httpx.ByteStream):  # already read (and bounded) by the transport
            return response.content
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise PollError(f"body is over the {MAX_BODY_BYTES} byte limit", http_status=200)
            chunks.append(chunk)
        return b"".join(chunks)

    # --- fine-tune endpoints (lifecycle and discovery) ------------------------------------------------
    # The same error wrapping and quick retries as fetch(); a follow-up can route fetch() through
    # _get_with_retries() too, so that every endpoint shares one retry and back-off path.

    # called once per HTTP attempt with (endpoint, outcome): endpoint in checkpoints, list, fine_tune; outcome in
    # ok, not_found, unauthorized, error. The daemon sets it to Metrics.observe_hub_request.
    on_request: Callable[[str, str], None] | None = None

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
        request = self._http.build_request("GET", path, params=params)
        ref = FineTuneRef(namespace=namespace, repo=repo, id="", name=f"{namespace}/{repo}")
        body = await self._get_with_retries(request, ref=ref, endpoint="list")
        return body if isinstance(body, FetchedNotFound) else parse_fine_tune_list(body)

    async def get_fine_tune(self, namespace: str, repo: str, fine_tune_id: str) -> HubFineTune | FetchedNotFound:
        """One fine-tune's current object (status, error, times); FetchedNotFound when the Hub says 404."""
        parts = (quote(part, safe="") for part in (namespace, repo, fine_tune_id))
        path = "/api/repos/{}/{}/fine_tunes/{}".format(*parts)
        ref = FineTuneRef(namespace=namespace, repo=repo, id=fine_tune_id, name=fine_tune_id)
        body = await self._get_with_retries(self._http.build_request("GET", path), ref=ref, endpoint="fine_tune")
        return body if isinstance(body, FetchedNotFound) else parse_fine_tune(body)

    async def _get_with_retries(
        self, request: httpx.Request, *, ref: FineTuneRef, endpoint: str
    ) -> bytes | FetchedNotFound:
        """One GET with fetch()'s quick retries of transient failures, within the same budget."""
        started = time.monotonic()
        tries = 0

        def backoff(exc: Exception) -> bool | float:
            nonlocal tries
            tries += 1
            if not isinstance(exc, HubUnavailable) or tries >= self._attempts:
                return False
            remaining = self._retry_budget_s - (time.monotonic() - started)
            wait = exc.retry_after_s
            gate_wait = self.gate.wait_s()
            if gate_wait > 0:  # the Hub-wide back-off binds every retry too
                wait = max(wait or 0.0, gate_wait)
            if remaining <= 0 or (wait is not None and wait > remaining) or not self.gate.take_retry():
                return False
            if self._on_retry is not None:
                self._on_retry(ref, exc, wait if wait is not None else 0.0)
            return wait if wait is not None else True

        last_error: HubUnavailable | None = None
        while True:
            # the Hub-wide back-off holds every endpoint, not only checkpoints: no request while it is closed
            if not self.gate.admit():
                raise last_error or HubUnavailable(
                    "held back: the Hub asked to slow down", retry_after_s=self.gate.wait_s()
                )
            try:
                return await self._get_once(request, endpoint=endpoint)
            except HubUnavailable as err:
                last_error = err
                wait = backoff(err)
                if wait is False:
                    raise
            delay = wait if not isinstance(wait, bool) else min(2.0, 0.2 * 2 ** (tries - 1)) + random.uniform(0, 0.3)
            await asyncio.sleep(delay)

    async def _get_once(self, request: httpx.Request, *, endpoint: str) -> bytes | FetchedNotFound:
        outcome = "error"
        try:
            try:
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
                self.gate.release_probe()
                raise HubUnavailable(f"timed out ({type(err).__name__})") from err
            except httpx.TransportError as err:
                self.gate.release_probe()
                raise HubUnavailable(f"connection failed ({type(err).__name__})") from err
            except asyncio.CancelledError:
                self.gate.release_probe()
                outcome = ""
                raise
            except httpx.HTTPError as err:
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
            if self.on_request is not None and outcome:
                self.on_request(endpoint, outcome)
