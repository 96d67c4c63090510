"""Webhooks signed the Standard Webhooks way: webhook-id, webhook-timestamp, webhook-signature (v1, HMAC-SHA256)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Sequence

import httpx
import orjson

from watcher.core.models import Event
from watcher.delivery.notifiers.base import DeliveryResult, new_http_client, post


def sign(keys: Sequence[bytes], *, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: one "v1,<base64 HMAC-SHA256 of id.timestamp.body>" per key."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys)


class WebhookNotifier:
    """POSTs each event's envelope as JSON, signed with every configured key (a rotation signs twice)."""

    digest_over: int | None = None

    def __init__(
        self,
        *,
        name: str,
        url: str,
        keys: Sequence[bytes] = (),
        timeout_s: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._url = url
        self._keys = tuple(keys)
        self._clock = clock
        self._http = new_http_client(timeout_s, transport)

    def request_parts(self, event: Event) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one attempt (the timestamp is this attempt's)."""
        body = orjson.dumps(event.envelope())
        timestamp = int(self._clock())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": event.id,
            "webhook-timestamp": str(timestamp),
        }
        if self._keys:
            headers["webhook-signature"] = sign(self._keys, msg_id=event.id, timestamp=timestamp, body=body)
        return body, headers

    async def send(self, events: Sequence[Event]) -> DeliveryResult:
        """Deliver one event."""
        (event,) = events
        body, headers = self.request_parts(event)
        return await post(self._http, self._url, content=body, headers=headers)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()
