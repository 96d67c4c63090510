"""The Notifier protocol, delivery outcomes, and the HTTP outcome rules webhook and Slack share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import httpx

from watcher.core.models import Event
from watcher.hub.client import parse_retry_after

Outcome = Literal["delivered", "retry", "dead"]


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What one delivery attempt came to; `disable` asks to stop the notifier (410 Gone)."""

    outcome: Outcome
    error: str | None = None
    http_status: int | None = None
    retry_after_s: float | None = None
    disable: bool = False


class Notifier(Protocol):
    """Something that delivers events: a webhook, a Slack channel, the log."""

    name: str
    digest_over: int | None  # more events than this from one poll go out as one digest; None: never

    async def send(self, events: Sequence[Event]) -> DeliveryResult:
        """Deliver one event (or, for digests, the events of one poll); never raises but for cancellation."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class Paced(Protocol):
    """A notifier behind a rate limit: the dispatcher waits for its turn outside the delivery timeout (a wait for
    a free slot is not a slow receiver), then sends at once; `send` alone still waits for its turn."""

    async def wait_turn(self) -> None:
        """Wait for a free slot and take it."""
        ...

    async def send_now(self, events: Sequence[Event]) -> DeliveryResult:
        """Deliver in the slot taken by `wait_turn` (no wait of its own)."""
        ...


def classify(
    status: int, *, body: str = "", headers: Mapping[str, str] | None = None, now: float | None = None
) -> DeliveryResult:
    """The outcome of an HTTP answer: 2xx delivered; 408/429/5xx retry; 410 dead and disable; else dead."""
    retry_after = parse_retry_after((headers or {}).get("retry-after"), now=now if now is not None else time.time())
    detail = " ".join(body.split())  # the caller redacts, then clips: clipping first could split a secret
    error = f"HTTP {status}" + (f": {detail}" if detail else "")
    if 200 <= status < 300:
        return DeliveryResult("delivered", http_status=status)
    if status == 410:
        return DeliveryResult("dead", error=error, http_status=status, disable=True)
    if status in (408, 429) or status >= 500:
        return DeliveryResult("retry", error=error, http_status=status, retry_after_s=retry_after)
    if 300 <= status < 400:
        return DeliveryResult("dead", error=f"{error} (redirects are not followed)", http_status=status)
    return DeliveryResult("dead", error=error, http_status=status)


def new_http_client(timeout_s: float, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """An HTTP client for a notifier: its own pool, its own timeout, no redirects."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        transport=transport,
        headers={"User-Agent": "oxen-watcher"},
    )


async def post(http: httpx.AsyncClient, url: str, *, content: bytes, headers: Mapping[str, str]) -> DeliveryResult:
    """POST and classify the answer; transport errors become retries, and no error text carries the URL."""
    try:
        response = await http.post(url, content=content, headers=dict(headers))
    except asyncio.CancelledError:
        raise
    except httpx.TimeoutException as err:
        return DeliveryResult("retry", error=f"timed out ({type(err).__name__})")
    except httpx.TransportError as err:
        return DeliveryResult("retry", error=f"connection failed ({type(err).__name__})")
    except httpx.HTTPError as err:
        return DeliveryResult("retry", error=f"HTTP error ({type(err).__name__})")
    body = response.content[:65536].decode(errors="replace")
    return classify(response.status_code, body=body, headers=response.headers)
