"""The HTTP endpoints: /metrics (optionally behind a bearer token), /healthz, /readyz, and the status page."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from watcher.core.health import Verdict
from watcher.observe.auth import authorized


class Pages(Protocol):
    """What the listener serves besides its own endpoints (the status page, web/site.py: handed in by the daemon)."""

    def guard(self, *, listen_host: str, listen_port: Callable[[], int], token: Callable[[], str | None]) -> Middleware:
        """A middleware for the pages' paths (the listener's own endpoints pass through it untouched)."""
        ...

    def install(self, app: web.Application) -> None:
        """Add the pages' routes."""
        ...

    async def close(self) -> None:
        """Release what the pages hold (their database, their worker thread)."""
        ...


class HttpServer:
    """Serves the endpoints on the daemon's event loop; metrics are rendered on a worker thread."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        registry: CollectorRegistry,
        liveness: Callable[[], Verdict],
        readiness: Callable[[], Verdict],
        token: str | None = None,
        pages: Pages | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._liveness = liveness
        self._readiness = readiness
        self._token = token
        self._pages = pages
        self._runner: web.AppRunner | None = None
        self.port = port

    def set_token(self, token: str | None) -> None:
        """Change the bearer token /metrics requires (a reload)."""
        self._token = token

    async def start(self) -> None:
        """Bind and serve."""
        guards = []
        if self._pages is not None:
            guards.append(
                self._pages.guard(listen_host=self._host, listen_port=lambda: self.port, token=lambda: self._token)
            )
        app = web.Application(middlewares=guards)
        if self._pages is not None:
            self._pages.install(app)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._pages is not None:
            await self._pages.close()

    async def _metrics(self, request: web.Request) -> web.Response:
        if not authorized(request.headers.get("Authorization"), self._token):
            return web.Response(status=401, text="unauthorized\n", headers={"WWW-Authenticate": "Bearer"})
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @staticmethod
    def _verdict(verdict: Verdict) -> web.Response:
        payload: dict[str, object] = {"status": "ok" if verdict.ok else "unavailable"}
        if verdict.reason:
            payload["reason"] = verdict.reason
        if verdict.detail:
            payload.update(verdict.detail)
        return web.Response(
            status=200 if verdict.ok else 503, body=orjson.dumps(payload), content_type="application/json"
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        return self._verdict(self._liveness())

    async def _readyz(self, request: web.Request) -> web.Response:
        return self._verdict(self._readiness())
