"""Slack incoming webhooks: Block Kit messages under 4,000 bytes, one per second per URL, digests on bursts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import orjson

from watcher.core.headline import Part, clip, describe, duration_text, headline
from watcher.core.models import Event, metric_of
from watcher.delivery.notifiers.base import DeliveryResult, new_http_client, post

MAX_PAYLOAD_BYTES = 3900  # Slack's limit is 4,000; leave room for a proxy's additions
DEFAULT_DIGEST_OVER = 5
_METRICS = (
    ("loss", "Loss"),
    ("mean_token_accuracy", "Mean token accuracy"),
    ("learning_rate", "Learning rate"),
    ("grad_norm", "Grad norm"),
    ("epoch", "Epoch"),
)


class RateLimiter:
    """At most one message per `interval_s` per webhook URL; a 429's Retry-After pushes the next slot back."""

    def __init__(self, *, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._next_at = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait for the next free slot and take it."""
        async with self._lock:
            # a loop, not one sleep: a 429 that arrives while we sleep pushes the slot further back
            wait = self._next_at - self._clock()
            while wait > 0:
                await asyncio.sleep(wait)
                wait = self._next_at - self._clock()
            self._next_at = self._clock() + self._interval_s

    def back_off(self, seconds: float) -> None:
        """Hold every message to this URL back for `seconds`."""
        self._next_at = max(self._next_at, self._clock() + seconds)


def _escape(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _number(value: float) -> str:
    return f"{value:.6g}"


def _mrkdwn(part: Part) -> str:
    text = clip(_escape(part.text), part.limit)
    if part.style == "strong":
        return f"*{text}*"
    if part.style == "code":
        return f"`{text}`"
    return "→" if part.style == "arrow" else text


def _headline(event: Event, *, subject: bool = True) -> str:
    """The event's headline (core/headline.py) in mrkdwn; without the fine-tune's name in a digest's list."""
    line = headline(event)
    icon = f":{line.icon}: " if line.icon else ""
    name = f"*{_escape(line.subject)}*: " if subject and line.subject is not None else ""
    badges = "".join(f" :{fact.badge}: {_escape(fact.text)}" for fact in line.facts if fact.badge)
    return icon + name + "".join(_mrkdwn(part) for part in line.sentence) + badges


def _lifecycle_fields(event: Event) -> list[dict[str, str]]:
    data = event.data
    if event.type != "fine_tune.status_changed" or "checkpoints" not in data:
        return []
    fields = []
    duration = duration_text(data.get("duration_s"))
    if duration:
        fields.append({"type": "mrkdwn", "text": f"*Duration*\n{duration}"})
    fields.append({"type": "mrkdwn", "text": f"*Checkpoints*\n{_escape(data.get('checkpoints'))}"})
    if data.get("latest_step") is not None:
        fields.append({"type": "mrkdwn", "text": f"*Latest step*\n{_escape(data['latest_step'])}"})
    best_loss = data.get("best_loss")
    if isinstance(best_loss, int | float) and not isinstance(best_loss, bool):
        step = _escape(data.get("best_step"))
        fields.append({"type": "mrkdwn", "text": f"*Best loss*\n{_number(best_loss)} at step {step}"})
    return fields


def _fields(event: Event) -> list[dict[str, str]]:
    checkpoint = event.data.get("checkpoint")
    if event.type.startswith("fine_tune."):
        return _lifecycle_fields(event)
    if not isinstance(checkpoint, dict) or event.type not in ("checkpoint.created", "checkpoint.updated"):
        return []
    fields = []
    for key, label in _METRICS:
        value = metric_of(checkpoint, key)
        if value is not None:
            suffix = " (best so far)" if key == "loss" and event.data.get("is_best_loss") else ""
            fields.append({"type": "mrkdwn", "text": f"*{label}*\n{_number(value)}{suffix}"})
    return fields


def _context(event: Event) -> dict[str, Any]:
    fine_tune = event.data.get("fine_tune") or {}
    where = "/".join(_escape(fine_tune.get(k, "?")) for k in ("namespace", "repo", "id"))
    return {
        "type": "context",
        "elements": [{"type": "mrkdwn", "text": clip(f"`{where}` · {_escape(event.type)} · {event.id}", 600)}],
    }


def _fit(payload: dict[str, Any]) -> dict[str, Any]:
    if len(orjson.dumps(payload)) <= MAX_PAYLOAD_BYTES:
        return payload
    # Shrink every text until it fits: the fallback, then each block's texts.
    for limit in (1500, 600, 200, 80):
        payload["text"] = clip(payload["text"], limit)
        for block in payload["blocks"]:
            if "text" in block:
                block["text"]["text"] = clip(block["text"]["text"], limit)
            for item in block.get("fields", []) + block.get("elements", []):
                item["text"] = clip(item["text"], limit // 4)
        if len(orjson.dumps(payload)) <= MAX_PAYLOAD_BYTES:
            return payload
    return {"text": payload["text"][:500]}


def message(event: Event) -> dict[str, Any]:
    """The Slack payload of one event: Block Kit blocks plus a plain `text` fallback, under 4,000 bytes."""
    section: dict[str, Any] = {"type": "section", "text": {"type": "mrkdwn", "text": clip(_headline(event), 2900)}}
    fields = _fields(event)
    if fields:
        section["fields"] = fields[:10]
    payload = {"text": clip(_escape(describe(event)), 1000), "blocks": [section, _context(event)]}
    return _fit(payload)


def digest(events: Sequence[Event]) -> dict[str, Any]:
    """One message listing a burst of events from one poll of one fine-tune, under 4,000 bytes."""
    fine_tune = events[0].data.get("fine_tune") or {}
    name = _escape(fine_tune.get("name", "?"))
    title = f"*{name}*: {len(events)} changes in one poll"
    lines: list[str] = []
    budget = 2400
    for index, event in enumerate(events):
        line = "• " + clip(_headline(event, subject=False), 200)
        if sum(len(item) + 1 for item in lines) + len(line) > budget:
            lines.append(f"…and {len(events) - index} more")
            break
        lines.append(line)
    first, last = events[0], events[-1]
    where = "/".join(_escape(fine_tune.get(k, "?")) for k in ("namespace", "repo", "id"))
    payload = {
        "text": clip(f"{name}: {len(events)} changes in one poll", 300),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": title}},
            {"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}},
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": clip(f"`{where}` · digest · {first.id} … {last.id}", 600)}],
            },
        ],
    }
    return _fit(payload)


class SlackNotifier:
    """Posts to a Slack incoming webhook; success is 200 with body "ok", errors are plain-text bodies."""

    def __init__(
        self,
        *,
        name: str,
        url: str,
        limiter: RateLimiter | None = None,
        digest_over: int | None = DEFAULT_DIGEST_OVER,
        timeout_s: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.digest_over = digest_over
        self._url = url
        self._limiter = limiter or RateLimiter()
        self._http = new_http_client(timeout_s, transport)

    def payload(self, events: Sequence[Event]) -> dict[str, Any]:
        """The message for one event, or a digest for a burst."""
        return message(events[0]) if len(events) == 1 else digest(events)

    async def send(self, events: Sequence[Event]) -> DeliveryResult:
        """Post one message (a digest when given several events), waiting for the URL's next slot."""
        await self.wait_turn()
        return await self.send_now(events)

    async def wait_turn(self) -> None:
        """Wait for this URL's next free slot (one a second, later after a 429) and take it."""
        await self._limiter.acquire()

    async def send_now(self, events: Sequence[Event]) -> DeliveryResult:
        """Post in the slot just taken; a 429 pushes every message to this URL back."""
        body = orjson.dumps(self.payload(events))
        result = await post(self._http, self._url, content=body, headers={"Content-Type": "application/json"})
        if result.http_status == 429:
            self._limiter.back_off(result.retry_after_s or 1.0)
        return result

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()
