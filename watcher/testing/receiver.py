"""A webhook receiver that verifies Standard Webhooks signatures (with the reference `standardwebhooks`
package) and prints each delivery: `python -m watcher.receiver --port 9000 --secret whsec_...`.

Tests use it as the real receiver on 127.0.0.1, scripting its answers (503s, 429 with Retry-After, 410).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from watcher.testing.background import BackgroundServer


@dataclass(frozen=True, slots=True)
class Answer:
    """A scripted answer: a status, headers and a body, for `times` requests."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    times: int = 1
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Received:
    """One request the receiver got, with whether its signature verified."""

    at: float
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    status: int

    @property
    def json(self) -> Any:
        """The parsed body."""
        return orjson.loads(self.body)

    @property
    def webhook_id(self) -> str | None:
        """The webhook-id header."""
        return self.headers.get("webhook-id")


class Receiver:
    """A webhook receiver on 127.0.0.1 in its own thread; answers 200 unless scripted otherwise."""

    def __init__(
        self, *, secret: str | None = None, host: str = "127.0.0.1", port: int = 0, echo: bool = False
    ) -> None:
        self._verifier = Webhook(secret) if secret else None
        self._host = host
        self._echo = echo
        self._lock = threading.Lock()
        self._script: deque[Answer] = deque()
        self.received: list[Received] = []
        self._server = BackgroundServer(self._make_app, host=host, port=port, name="receiver")

    @property
    def url(self) -> str:
        """Where to point a webhook notifier."""
        return f"http://{self._host}:{self.port}/hook"

    def script(self, *answers: Answer) -> None:
        """Queue answers for the next requests."""
        with self._lock:
            self._script.extend(answers)

    def deliveries(self) -> list[Received]:
        """What was received so far."""
        with self._lock:
            return list(self.received)

    @property
    def port(self) -> int:
        """The bound port (after start())."""
        return self._server.port

    def start(self) -> Receiver:
        """Serve in a background thread."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified = False
        if self._verifier is not None:
            try:
                self._verifier.verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        with self._lock:
            answer = Answer()
            if self._script:
                answer = self._script[0]
                if answer.times <= 1:
                    self._script.popleft()
                else:
                    self._script[0] = Answer(
                        answer.status, answer.headers, answer.body, answer.times - 1, answer.delay_s
                    )
            if self._verifier is not None and not verified:
                answer = Answer(status=401, body="signature did not verify")
            self.received.append(Received(time.time(), request.path, headers, body, verified, answer.status))
        if self._echo:
            self._print(headers, body, verified, answer.status)
        if answer.delay_s:
            await asyncio.sleep(answer.delay_s)
        return web.Response(status=answer.status, text=answer.body, headers=answer.headers)

    @staticmethod
    def _print(headers: dict[str, str], body: bytes, verified: bool, status: int) -> None:
        try:
            event = orjson.loads(body)
            summary = f"{event.get('type')} {event.get('id')}"
        except orjson.JSONDecodeError:
            summary = f"{len(body)} bytes, not JSON"
        mark = "verified" if verified else "NOT VERIFIED"
        print(f"webhook {headers.get('webhook-id')} [{mark}] -> {status}: {summary}", flush=True)


def main() -> None:
    """Run the receiver in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(description="Print (and verify) Standard Webhooks deliveries.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--secret", help='the signing secret, "whsec_..."; omit to accept unsigned deliveries')
    args = parser.parse_args()
    receiver = Receiver(secret=args.secret, host=args.host, port=args.port, echo=True).start()
    print(f"receiving webhooks on http://{args.host}:{receiver.port}/ (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()


if __name__ == "__main__":
    main()
