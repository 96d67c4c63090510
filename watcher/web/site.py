"""The status page's routes on the daemon's HTTP listener; reads and rendering run on a worker thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib.resources import files
from typing import Any, TypeVar

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from watcher.core.health import PollHealth, Verdict
from watcher.core.models import EVENT_TYPES, FineTuneRef
from watcher.errors import StoreError
from watcher.store.pages import Reports
from watcher.web import pages
from watcher.web.security import guard
from watcher.web.views import PAGE_SIZE, LiveSnapshot, parse_page, parse_sort

log = structlog.get_logger("watcher.web")
T = TypeVar("T")
MAX_PER_PAGE = 2000
MAX_EVENTS = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveSources:
    """Where the page reads the daemon's in-memory state: each is called on the event loop at every request, so
    a reload that replaces what they return shows at once."""

    watched: Callable[[], Mapping[str, FineTuneRef]]  # every fine-tune the config watches, by key, whoever polls it
    health: Callable[[], Mapping[str, PollHealth]]  # this process's records (updated in place: copied here)
    notifiers: Callable[[], Iterable[str]]  # the configured notifiers' names
    disabled: Callable[[], Iterable[str]]  # notifiers turned off by a permanent failure
    liveness: Callable[[], Verdict]
    readiness: Callable[[], Verdict]
    clock: Callable[[], float] = time.time

    def snapshot(self) -> LiveSnapshot:
        """The daemon's in-memory state now: copies, safe to hand to a worker thread."""
        return LiveSnapshot(
            refs=tuple(self.watched().values()),
            health={key: replace(entry) for key, entry in dict(self.health()).items()},
            notifiers=tuple(self.notifiers()),
            disabled=frozenset(self.disabled()),
            alive=self.liveness(),
            ready=self.readiness(),
            now=self.clock(),
        )


class StatusPages:
    """The HTML pages, the JSON API and the static files; one worker thread does every read and render."""

    def __init__(self, *, reports: Reports, snapshot: Callable[[], LiveSnapshot]) -> None:
        self._reports = reports
        self._snapshot = snapshot
        self._executor = ThreadPoolExecutor(1, "pages")
        self._closed = False
        static = files("watcher.web").joinpath("static")
        self._static = {
            "status.css": (static.joinpath("status.css").read_bytes(), "text/css"),
            "favicon.svg": (static.joinpath("favicon.svg").read_bytes(), "image/svg+xml"),
        }

    def guard(self, *, listen_host: str, listen_port: Callable[[], int], token: Callable[[], str | None]) -> Middleware:
        """The middleware the listener installs: Host check, GET only, token, security headers."""
        return guard(listen_host=listen_host, listen_port=listen_port, token=token)

    def install(self, app: web.Application) -> None:
        """Add the routes (GET; aiohttp answers HEAD too)."""
        app.router.add_get("/", self._overview)
        app.router.add_get("/events", self._events)
        app.router.add_get("/fine-tunes/{namespace}/{repo}/{id}", self._run)
        app.router.add_get("/api/v1/fine-tunes", self._api_fine_tunes)
        app.router.add_get("/api/v1/fine-tunes/{namespace}/{repo}/{id}/checkpoints", self._api_checkpoints)
        app.router.add_get("/api/v1/events", self._api_events)
        app.router.add_get("/static/{name}", self._static_file)

    async def close(self) -> None:
        """Stop the worker thread and release the database (once; a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._reports.close)
        self._executor.shutdown(wait=False)

    # --- plumbing -----------------------------------------------------------------------------------

    async def _off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def _page(self, live: LiveSnapshot, fn: Callable[..., str], *args: Any, **kwargs: Any) -> web.Response:
        try:
            body = await self._off_loop(fn, self._reports, live, *args, **kwargs)
        except StoreError as err:
            log.warning("pages.store_failed", error=str(err))
            return await self._error(live, 503, "the state database cannot be read right now")
        return web.Response(text=body, content_type="text/html", charset="utf-8")

    async def _error(self, live: LiveSnapshot, status: int, message: str) -> web.Response:
        body = await self._off_loop(pages.error_html, live, status=status, message=message)
        return web.Response(status=status, text=body, content_type="text/html", charset="utf-8")

    async def _json(self, fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> web.Response:
        try:
            document = await self._off_loop(fn, self._reports, *args, **kwargs)
        except StoreError as err:
            log.warning("pages.store_failed", error=str(err))
            return _json_response({"error": "the state database cannot be read right now"}, status=503)
        return _json_response(document)

    @staticmethod
    def _ref(live: LiveSnapshot, request: web.Request) -> FineTuneRef | None:
        info = request.match_info
        key = f"{info['namespace']}/{info['repo']}/{info['id']}"
        return next((ref for ref in live.refs if ref.key == key), None)

    # --- pages --------------------------------------------------------------------------------------

    async def _overview(self, request: web.Request) -> web.Response:
        column, descending = parse_sort(request.query.get("sort"))
        page = parse_page(request.query.get("page"))
        return await self._page(self._snapshot(), pages.overview_html, column=column, descending=descending, page=page)

    async def _run(self, request: web.Request) -> web.Response:
        live = self._snapshot()
        ref = self._ref(live, request)
        if ref is None:
            return await self._error(live, 404, "no watched fine-tune has this namespace, repo and id")
        return await self._page(live, pages.run_html, ref, log=request.query.get("scale") == "log")

    async def _events(self, request: web.Request) -> web.Response:
        live = self._snapshot()
        kind, fine_tune = _event_filters(request)
        return await self._page(live, pages.events_html, type=kind, fine_tune=fine_tune)

    async def _static_file(self, request: web.Request) -> web.Response:
        found = self._static.get(request.match_info["name"])
        if found is None:
            return web.Response(status=404, text="not found\n")
        body, content_type = found
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    # --- the JSON API -------------------------------------------------------------------------------

    async def _api_fine_tunes(self, request: web.Request) -> web.Response:
        column, descending = parse_sort(request.query.get("sort"))
        page = parse_page(request.query.get("page"))
        per_page = min(MAX_PER_PAGE, parse_page(request.query.get("per_page") or str(PAGE_SIZE)))
        return await self._json(
            pages.overview_json,
            self._snapshot(),
            column=column,
            descending=descending,
            page=page,
            per_page=per_page,
        )

    async def _api_checkpoints(self, request: web.Request) -> web.Response:
        ref = self._ref(self._snapshot(), request)
        if ref is None:
            return _json_response({"error": "no watched fine-tune has this namespace, repo and id"}, status=404)
        return await self._json(pages.checkpoints_json, ref)

    async def _api_events(self, request: web.Request) -> web.Response:
        kind, fine_tune = _event_filters(request)
        limit = min(MAX_EVENTS, parse_page(request.query.get("limit") or "100"))
        return await self._json(pages.events_json, limit=limit, type=kind, fine_tune=fine_tune)


def _event_filters(request: web.Request) -> tuple[str | None, str | None]:
    kind = request.query.get("type") or None
    fine_tune = request.query.get("fine_tune") or None
    return (kind if kind in EVENT_TYPES else None), fine_tune


def _json_response(document: Mapping[str, Any] | Sequence[Any], *, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(document), content_type="application/json")
