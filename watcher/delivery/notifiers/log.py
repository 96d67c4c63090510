"""The log notifier: each event as a readable line (or its JSON envelope) on stdout; what `demo` uses."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Literal, TextIO

import orjson

from watcher.core.headline import describe
from watcher.core.models import Event
from watcher.delivery.notifiers.base import DeliveryResult


class LogNotifier:
    """Writes events to a stream, one line each."""

    digest_over: int | None = None

    def __init__(self, *, name: str, fmt: Literal["text", "json"] = "text", stream: TextIO | None = None) -> None:
        self.name = name
        self._format = fmt
        self._stream = stream

    def line(self, event: Event) -> str:
        """The line written for an event."""
        if self._format == "json":
            return orjson.dumps(event.envelope()).decode()
        try:
            when = datetime.fromisoformat(event.timestamp).astimezone().strftime("%H:%M:%S")
        except ValueError:
            when = event.timestamp
        return f"{when}  {event.type:<30} {describe(event)}"

    async def send(self, events: Sequence[Event]) -> DeliveryResult:
        """Write the events."""
        try:
            stream = self._stream or sys.stdout
            for event in events:
                stream.write(self.line(event) + "\n")
            stream.flush()
        except (OSError, ValueError, AttributeError) as err:  # closed, missing or non-UTF-8 stdout
            return DeliveryResult("retry", error=f"cannot write: {type(err).__name__}")
        return DeliveryResult("delivered")

    async def aclose(self) -> None:
        """Nothing to release."""
