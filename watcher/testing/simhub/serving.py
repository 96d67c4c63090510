"""The simulated Hub's HTTP side: the checkpoints, single fine-tune and list endpoints, with faults and auth."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import orjson
from aiohttp import web

from watcher.testing.simhub import runs
from watcher.testing.simhub.faults import Endpoint, Fault, RequestRecord, answer_fault, error_body, next_fault
from watcher.testing.simhub.runs import FineTuneRecord, key_of

PATH = "/api/repos/{namespace}/{repo}/fine_tunes/{id}/checkpoints"
LIST_PATH = "/api/repos/{namespace}/{repo}/fine_tunes"
FINE_TUNE_PATH = "/api/repos/{namespace}/{repo}/fine_tunes/{id}"
JSON_TYPE = "application/json"


class Serving:
    """The request handlers of SimHub (which owns the state below and sets it up)."""

    token: str | None
    gzip: bool
    list_form: Literal["full", "simple"]
    on_list: Callable[[str, int], None] | None
    _lock: threading.Lock
    _clock: Callable[[], float]
    _fine_tunes: dict[str, FineTuneRecord]
    _global_faults: deque[Fault]
    _repo_faults: dict[str, deque[Fault]]
    _requests: list[RequestRecord]

    def make_app(self) -> web.Application:
        """The aiohttp application (also usable on its own, e.g. in another process)."""
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        app.router.add_get(FINE_TUNE_PATH, self._handle_fine_tune)
        app.router.add_get(LIST_PATH, self._handle_list)
        return app

    def _visible(self, key: str) -> FineTuneRecord | None:
        fine_tune = self._fine_tunes.get(key)
        if fine_tune is None or fine_tune.run.visible_at > self._clock():
            return None
        return fine_tune

    def _object_of(self, fine_tune: FineTuneRecord, form: Literal["full", "simple"]) -> dict[str, Any]:
        repository_id = f"repo_{fine_tune.namespace}_{fine_tune.repo}"
        return runs.fine_tune_object(
            fine_tune.id, fine_tune.name, fine_tune.run, repository_id=repository_id, form=form
        )

    @staticmethod
    def _body_of(fine_tune: FineTuneRecord) -> bytes:
        if fine_tune.body is None:
            checkpoints = [fine_tune.checkpoints[s] for s in sorted(fine_tune.checkpoints)]
            fine_tune.body = orjson.dumps(
                {
                    # the model branch exists once the first checkpoint was saved
                    "branch": f"{fine_tune.name}-model" if checkpoints else "",
                    "checkpoints": checkpoints,
                    "fine_tune_id": fine_tune.id,
                    "status": "success",
                    "status_message": "resource_found",
                    "total_checkpoints": len(checkpoints),
                }
            )
        return fine_tune.body

    def _faults_of(self, key: str) -> deque[Fault] | None:
        known = self._fine_tunes.get(key)
        return known.faults if known is not None else None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        key = key_of(info["namespace"], info["repo"], info["id"])

        def answer() -> bytes | None:
            fine_tune = self._visible(key)
            return None if fine_tune is None else self._body_of(fine_tune)

        return await self._serve(request, key, "checkpoints", lambda: self._faults_of(key), answer)

    async def _handle_fine_tune(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        key = key_of(info["namespace"], info["repo"], info["id"])

        def answer() -> bytes | None:
            fine_tune = self._visible(key)
            if fine_tune is None:
                return None
            runs.apply_due(fine_tune.run, self._clock())
            document = {
                "fine_tune": self._object_of(fine_tune, "full"),
                "status": "success",
                "status_message": "resource_found",
            }
            return orjson.dumps(document)

        # a fine-tune's faults without an endpoint are its checkpoint polls' (the watcher reads statuses too)
        return await self._serve(request, key, "fine_tune", lambda: self._faults_of(key), answer, explicit=True)

    async def _handle_list(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        repo_key = f"{info['namespace']}/{info['repo']}"
        if self.on_list is not None:
            page = request.query.get("page", "1")
            self.on_list(repo_key, int(page) if page.isascii() and page.isdigit() else 0)

        def answer() -> bytes:
            now = self._clock()
            prefix = repo_key + "/"
            entries = []
            by_id: dict[str, FineTuneRecord] = {}
            for key, fine_tune in self._fine_tunes.items():
                if key.startswith(prefix) and fine_tune.run.visible_at <= now:
                    runs.apply_due(fine_tune.run, now)
                    entries.append((fine_tune.id, fine_tune.name, fine_tune.run))
                    by_id[fine_tune.id] = fine_tune
            chosen = runs.select_page(entries, request.query)  # BadQuery: 400
            objects = [self._object_of(by_id[fine_tune_id], self.list_form) for fine_tune_id, _, _ in chosen]
            return orjson.dumps({"fine_tunes": objects, "status": "success", "status_message": "resource_found"})

        # an unknown repository lists nothing (as for a repository without fine-tunes)
        return await self._serve(request, repo_key, "list", lambda: self._repo_faults.get(repo_key), answer)

    async def _serve(
        self,
        request: web.Request,
        key: str,
        endpoint: Endpoint,
        faults: Callable[[], deque[Fault] | None],
        answer: Callable[[], bytes | None],
        *,
        explicit: bool = False,
    ) -> web.StreamResponse:
        """Faults first, then 401, then the answer (None: 404); every request recorded."""
        authorized = self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}"
        body: bytes | None = None
        bad_query: str | None = None
        with self._lock:
            fault = next_fault((self._global_faults,), endpoint) or next_fault((faults(),), endpoint, explicit=explicit)
            if fault is None and authorized:
                try:
                    body = answer()
                except runs.BadQuery as err:
                    bad_query = str(err)
        if fault is not None:
            status = fault.status
        elif not authorized:
            status = 401
        elif bad_query is not None:
            status = 400
        else:
            status = 404 if body is None else 200
        with self._lock:
            self._requests.append(RequestRecord(time.time(), key, status, authorized, endpoint))
        if fault is not None:
            return await answer_fault(request, fault)
        if status == 401:
            return web.Response(
                status=401, body=error_body("unauthenticated", "Unauthenticated"), content_type=JSON_TYPE
            )
        if status == 400:
            return web.Response(status=400, body=error_body("invalid_params", bad_query or ""), content_type=JSON_TYPE)
        if status == 404:
            not_found = error_body("resource_not_found", "Fine-tune not found")
            return web.Response(status=404, body=not_found, content_type=JSON_TYPE)
        response = web.Response(body=body, content_type=JSON_TYPE)
        if self.gzip:
            response.enable_compression(web.ContentCoding.gzip)
        return response
