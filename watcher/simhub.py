"""A simulated Oxen Hub: the checkpoints and fine-tune endpoints as the reference documents them, on 127.0.0.1.

A real HTTP server (aiohttp, in its own thread and event loop) with a thread-safe programmatic API to add
fine-tunes and checkpoints, change deployment statuses, script fine-tune status transitions (created ->
tokenizing -> enqueued -> running -> completed / errored / stopped), make fine-tunes appear later, and inject
faults into any endpoint. Tests, `demo` and the benchmark use it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from aiohttp import web

from . import simhub_runs as runs
from .background import BackgroundServer
from .simhub_runs import RunInfo, StatusStep

__all__ = ["DEFAULT_TOKEN", "Fault", "RequestRecord", "SimHub", "StatusStep", "keys_of"]

DEFAULT_TOKEN = "simhub-token"
PATH = "/api/repos/{namespace}/{repo}/fine_tunes/{id}/checkpoints"
LIST_PATH = "/api/repos/{namespace}/{repo}/fine_tunes"
FINE_TUNE_PATH = "/api/repos/{namespace}/{repo}/fine_tunes/{id}"
Endpoint = Literal["checkpoints", "fine_tune", "list"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One injected answer: a status with an optional Retry-After, a raw body, a delay, or a cut connection."""

    status: int = 503
    retry_after: str | None = None
    body: bytes | None = None
    content_type: str = "application/json"
    delay_s: float = 0.0
    truncate: bool = False  # announce a longer body than is sent, then close the connection
    trickle_s: float = 0.0  # send the body a byte at a time, spread over this many seconds
    times: int | None = 1  # how many requests it answers; None: until cleared
    endpoint: Endpoint | None = None  # only requests to this endpoint (checkpoints, fine_tune, list); None: any


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the simulated Hub received."""

    at: float
    key: str  # "namespace/repo/id", or "namespace/repo" for a list
    status: int
    authorized: bool
    endpoint: Endpoint = "checkpoints"


@dataclass
class _FineTune:
    namespace: str
    repo: str
    id: str
    name: str
    checkpoints: dict[int, dict[str, Any]] = field(default_factory=dict)
    faults: deque[Fault] = field(default_factory=deque)
    body: bytes | None = None  # cached serialized answer, dropped on every change
    run: RunInfo = field(default_factory=lambda: RunInfo(created_at=time.time(), seq=0))


def _key(namespace: str, repo: str, fine_tune_id: str) -> str:
    return f"{namespace}/{repo}/{fine_tune_id}"


def _error_body(kind: str, title: str) -> bytes:
    return orjson.dumps({"error": {"type": kind, "title": title}, "status": "error", "status_message": kind})


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class SimHub:
    """The simulated Hub; use as a context manager or call start() and stop()."""

    def __init__(
        self,
        *,
        token: str | None = DEFAULT_TOKEN,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token = token
        self._clock = clock  # drives created_at, scripted transitions and appearances
        self._seq = 0
        self._repo_faults: dict[str, deque[Fault]] = {}
        self.list_form: Literal["full", "simple"] = "full"  # list entries: every documented field, or the few
        # called with (repo key "namespace/repo", page) before a list page is answered, outside the lock:
        # a test adds or removes fine-tunes there to shift the list while it is being read
        self.on_list: Callable[[str, int], None] | None = None
        self._host = host
        self._lock = threading.Lock()
        self._fine_tunes: dict[str, _FineTune] = {}
        self._global_faults: deque[Fault] = deque()
        self._requests: list[RequestRecord] = []
        self._record_requests = True
        self.gzip = False  # answer with Content-Encoding: gzip when the client accepts it
        self._server = BackgroundServer(self.make_app, host=host, port=port, name="simhub")

    # --- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL to configure as [hub] url."""
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (after start())."""
        return self._server.port

    def start(self) -> SimHub:
        """Start serving in a background thread; returns once the socket is bound."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        self._server.stop()

    def __enter__(self) -> SimHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def make_app(self) -> web.Application:
        """The aiohttp application (also usable on its own, e.g. in another process)."""
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        app.router.add_get(FINE_TUNE_PATH, self._handle_fine_tune)
        app.router.add_get(LIST_PATH, self._handle_list)
        return app

    # --- programmatic API --------------------------------------------------------------------------

    def add_fine_tune(
        self,
        namespace: str,
        repo: str,
        fine_tune_id: str,
        *,
        name: str | None = None,
        status: str = "running",
        error: str | None = None,
        base_model: str = "Qwen/Qwen3-0.6B",
        created_by: str | None = "simuser",
        created_at: float | None = None,
        finished_at: float | None = None,
        appear_after_s: float = 0.0,
    ) -> str:
        """Make a fine-tune exist (with no checkpoints yet) in a status; returns its key.

        `created_at` / `finished_at` (Unix seconds) backdate it; `appear_after_s` makes it appear that much
        later (until then it answers 404 and is not listed), and its created_at is then the appearance time.
        """
        key = _key(namespace, repo, fine_tune_id)
        now = self._clock()
        with self._lock:
            if key in self._fine_tunes:
                return key
            self._seq += 1
            visible_at = now + appear_after_s
            run = RunInfo(
                created_at=created_at if created_at is not None else visible_at,
                seq=self._seq,
                base_model=base_model,
                created_by=created_by,
                visible_at=visible_at,
            )
            run.status = status
            run.updated_at = run.created_at
            if status not in ("created", "tokenizing", "enqueued"):
                run.started_at = run.created_at
            runs.set_status(run, status, now=finished_at if finished_at is not None else run.created_at, error=error)
            run.updated_at = max(run.created_at, run.finished_at or 0.0)
            self._fine_tunes[key] = _FineTune(namespace, repo, fine_tune_id, name or fine_tune_id, run=run)
        return key

    def set_status(self, key: str, status: str, *, error: str | None = None) -> None:
        """Move a fine-tune to a status now (started_at on running, finished_at and error when it ends)."""
        with self._lock:
            run = self._fine_tunes[key].run
            run.script.clear()
            runs.set_status(run, status, now=self._clock(), error=error)

    def script(self, key: str, *steps: StatusStep) -> None:
        """Schedule status transitions (each `at_s` seconds from now); they apply as time passes."""
        with self._lock:
            runs.script(self._fine_tunes[key].run, steps, now=self._clock())

    def script_run(
        self, key: str, *, step_s: float = 1.0, run_s: float = 5.0, outcome: str = "completed", error: str | None = None
    ) -> None:
        """Script a whole run from now: created, tokenizing, enqueued, running (run_s), then the outcome."""
        self.script(key, *runs.run_steps(step_s=step_s, run_s=run_s, outcome=outcome, error=error))

    def fine_tune(self, key: str) -> dict[str, Any]:
        """The fine-tune's current FineTune object (as GET .../fine_tunes/{id} answers it)."""
        with self._lock:
            fine_tune = self._fine_tunes[key]
            runs.apply_due(fine_tune.run, self._clock())
            return self._object_of(fine_tune, "full")

    def remove_fine_tune(self, key: str) -> None:
        """Make a fine-tune disappear: it answers 404 from now on."""
        with self._lock:
            self._fine_tunes.pop(key, None)

    def add_checkpoint(
        self,
        key: str,
        step: int | None = None,
        *,
        loss: float | None = None,
        metrics: Mapping[str, Any] | None = None,
        inference_samples: list[dict[str, Any]] | None = None,
        deployment_status: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Add a checkpoint (the next step by default) with realistic fields; returns it."""
        with self._lock:
            fine_tune = self._fine_tunes[key]
            if step is None:
                step = max(fine_tune.checkpoints, default=0) + 100
            checkpoint: dict[str, Any] = {
                "created_at": _now_iso(),
                "deployment_status": deployment_status,
                "inference_samples": inference_samples if inference_samples is not None else [],
                "metrics": {
                    "epoch": round(step / 1000, 4),
                    "grad_norm": 1.0,
                    "learning_rate": 2e-5,
                    "loss": loss,
                    "mean_token_accuracy": None if loss is None else round(max(0.0, 1 - loss / 4), 4),
                    **(metrics or {}),
                },
                "model_id": None,
                "model_name": f"{fine_tune.name}-step-{step}",
                "path": f"checkpoints/step-{step}",
                "size_bytes": 1_234_567_890,
                "step": step,
                **fields,
            }
            fine_tune.checkpoints[step] = checkpoint
            fine_tune.body = None
            return dict(checkpoint)

    def update_checkpoint(self, key: str, step: int, **fields: Any) -> dict[str, Any]:
        """Change fields of a checkpoint (`metrics` merges into the existing metrics); returns it."""
        with self._lock:
            fine_tune = self._fine_tunes[key]
            checkpoint = fine_tune.checkpoints[step]
            for name, value in fields.items():
                if name == "metrics" and isinstance(value, Mapping):
                    checkpoint["metrics"] = {**(checkpoint.get("metrics") or {}), **value}
                else:
                    checkpoint[name] = value
            fine_tune.body = None
            return dict(checkpoint)

    def set_deployment_status(self, key: str, step: int, status: str | None) -> None:
        """Set a checkpoint's deployment status (and a model id once it is deployed)."""
        fields: dict[str, Any] = {"deployment_status": status}
        if status is not None:
            fields["model_id"] = f"model_{key.rsplit('/', 1)[-1]}_{step}"
        self.update_checkpoint(key, step, **fields)

    def remove_checkpoint(self, key: str, step: int) -> None:
        """Delete a checkpoint from the list."""
        with self._lock:
            fine_tune = self._fine_tunes[key]
            fine_tune.checkpoints.pop(step, None)
            fine_tune.body = None

    def checkpoints(self, key: str) -> list[dict[str, Any]]:
        """The current checkpoints of a fine-tune, by step."""
        with self._lock:
            fine_tune = self._fine_tunes[key]
            return [dict(fine_tune.checkpoints[s]) for s in sorted(fine_tune.checkpoints)]

    def inject(self, key: str | None, *faults: Fault) -> None:
        """Queue faults for one fine-tune ("namespace/repo/id": its checkpoints and fine_tune endpoints), one
        repository's list ("namespace/repo"), or every request (None); answered in order per endpoint."""
        with self._lock:
            self._queue_of(key).extend(faults)

    def _queue_of(self, key: str | None) -> deque[Fault]:
        if key is None:
            return self._global_faults
        if key.count("/") == 1:
            return self._repo_faults.setdefault(key, deque())
        return self._fine_tunes[key].faults

    def clear_faults(self, key: str | None = None) -> None:
        """Drop queued faults of one fine-tune, or all faults when key is None."""
        with self._lock:
            if key is None:
                self._global_faults.clear()
                self._repo_faults.clear()
                for fine_tune in self._fine_tunes.values():
                    fine_tune.faults.clear()
            else:
                self._queue_of(key).clear()

    def requests(self, key: str | None = None) -> list[RequestRecord]:
        """The requests received so far (for one fine-tune when key is given)."""
        with self._lock:
            return [r for r in self._requests if key is None or r.key == key]

    def set_request_log(self, enabled: bool) -> None:
        """Turn request recording off for long benchmark runs."""
        self._record_requests = enabled

    # --- serving -------------------------------------------------------------------------------------

    def _next_fault(self, queue: deque[Fault] | None, endpoint: Endpoint = "checkpoints") -> Fault | None:
        for faults in (self._global_faults, queue):
            if not faults:
                continue
            for index, fault in enumerate(faults):
                if fault.endpoint is not None and fault.endpoint != endpoint:
                    continue
                if fault.times is not None:
                    if fault.times <= 1:
                        del faults[index]
                    else:
                        faults[index] = Fault(**{**_fault_fields(fault), "times": fault.times - 1})
                return fault
        return None

    def _visible(self, key: str) -> _FineTune | None:
        fine_tune = self._fine_tunes.get(key)
        if fine_tune is None or fine_tune.run.visible_at > self._clock():
            return None
        return fine_tune

    def _object_of(self, fine_tune: _FineTune, form: Literal["full", "simple"]) -> dict[str, Any]:
        repository_id = f"repo_{fine_tune.namespace}_{fine_tune.repo}"
        return runs.fine_tune_object(
            fine_tune.id, fine_tune.name, fine_tune.run, repository_id=repository_id, form=form
        )

    def _body_of(self, fine_tune: _FineTune) -> bytes:
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

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        key = _key(info["namespace"], info["repo"], info["id"])
        authorized = self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}"
        with self._lock:
            known = self._fine_tunes.get(key)
            fault = self._next_fault(known.faults if known else None)
            fine_tune = self._visible(key)
            body = self._body_of(fine_tune) if fine_tune is not None and fault is None and authorized else None
        if fault is not None:
            status = fault.status
        elif not authorized:
            status = 401
        elif fine_tune is None:
            status = 404
        else:
            status = 200
        if self._record_requests:
            with self._lock:
                self._requests.append(RequestRecord(time.time(), key, status, authorized))
        if fault is not None:
            return await self._answer_fault(request, fault)
        if status == 401:
            return web.Response(
                status=401, body=_error_body("unauthenticated", "Unauthenticated"), content_type="application/json"
            )
        if status == 404:
            return web.Response(
                status=404,
                body=_error_body("resource_not_found", "Fine-tune not found"),
                content_type="application/json",
            )
        response = web.Response(body=body, content_type="application/json")
        if self.gzip:
            response.enable_compression(web.ContentCoding.gzip)
        return response

    async def _handle_fine_tune(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        key = _key(info["namespace"], info["repo"], info["id"])

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

        known = self._fine_tunes.get(key)
        return await self._serve(request, key, "fine_tune", known.faults if known else None, answer)

    async def _handle_list(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        repo_key = f"{info['namespace']}/{info['repo']}"
        if self.on_list is not None:
            page = request.query.get("page", "1")
            self.on_list(repo_key, int(page) if page.isascii() and page.isdigit() else 0)

        def answer() -> bytes | None:
            now = self._clock()
            prefix = repo_key + "/"
            entries = []
            by_id: dict[str, _FineTune] = {}
            for key, fine_tune in self._fine_tunes.items():
                if key.startswith(prefix) and fine_tune.run.visible_at <= now:
                    runs.apply_due(fine_tune.run, now)
                    entries.append((fine_tune.id, fine_tune.name, fine_tune.run))
                    by_id[fine_tune.id] = fine_tune
            chosen = runs.select_page(entries, request.query)  # BadQuery: 400
            objects = [self._object_of(by_id[fine_tune_id], self.list_form) for fine_tune_id, _, _ in chosen]
            return orjson.dumps({"fine_tunes": objects, "status": "success", "status_message": "resource_found"})

        # an unknown repository lists nothing (the Hub's answer for a repo without fine-tunes)
        return await self._serve(request, repo_key, "list", self._repo_faults.get(repo_key), answer)

    async def _serve(
        self,
        request: web.Request,
        key: str,
        endpoint: Endpoint,
        faults: deque[Fault] | None,
        answer: Callable[[], bytes | None],
    ) -> web.StreamResponse:
        """Faults first, then 401, then the answer (None: 404), recorded like the checkpoints endpoint's."""
        authorized = self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}"
        body: bytes | None = None
        bad_query: str | None = None
        with self._lock:
            fault = self._next_fault(faults, endpoint)
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
        if self._record_requests:
            with self._lock:
                self._requests.append(RequestRecord(time.time(), key, status, authorized, endpoint))
        if fault is not None:
            return await self._answer_fault(request, fault)
        if status == 401:
            return web.Response(
                status=401, body=_error_body("unauthenticated", "Unauthenticated"), content_type="application/json"
            )
        if status == 400:
            return web.Response(
                status=400, body=_error_body("invalid_params", bad_query or ""), content_type="application/json"
            )
        if status == 404:
            return web.Response(
                status=404,
                body=_error_body("resource_not_found", "Fine-tune not found"),
                content_type="application/json",
            )
        response = web.Response(body=body, content_type="application/json")
        if self.gzip:
            response.enable_compression(web.ContentCoding.gzip)
        return response

    @staticmethod
    async def _answer_fault(request: web.Request, fault: Fault) -> web.StreamResponse:
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        body = fault.body if fault.body is not None else _error_body("unknown_error", f"Injected {fault.status}")
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        if fault.trickle_s:
            response = web.StreamResponse(status=fault.status, headers=headers)
            response.content_type = fault.content_type
            response.content_length = len(body)
            await response.prepare(request)
            for index in range(len(body)):
                await response.write(body[index : index + 1])
                await asyncio.sleep(fault.trickle_s / max(1, len(body)))
            return response
        if fault.truncate:
            response = web.StreamResponse(status=fault.status, headers=headers)
            response.content_type = fault.content_type
            response.content_length = len(body) * 2 + 10
            await response.prepare(request)
            await response.write(body[: max(1, len(body) // 2)])
            if request.transport is not None:
                request.transport.close()
            return response
        return web.Response(status=fault.status, body=body, headers=headers, content_type=fault.content_type)


def _fault_fields(fault: Fault) -> dict[str, Any]:
    return {name: getattr(fault, name) for name in Fault.__dataclass_fields__}


def keys_of(fine_tunes: Iterable[tuple[str, str, str]]) -> list[str]:
    """Keys "namespace/repo/id" of (namespace, repo, id) triples."""
    return [_key(*triple) for triple in fine_tunes]


# --- standalone process (benchmarks) --------------------------------------------------------------------


def _stats_route(hub: SimHub) -> web.RouteDef:
    async def stats(request: web.Request) -> web.Response:
        with hub._lock:
            records = list(hub._requests)
        per_key: dict[str, list[float]] = {}
        per_endpoint: dict[str, int] = {}
        for record in records:
            per_key.setdefault(record.key, []).append(record.at)
            per_endpoint[record.endpoint] = per_endpoint.get(record.endpoint, 0) + 1
        document = {"requests": len(records), "times": per_key, "endpoints": per_endpoint}
        return web.Response(body=orjson.dumps(document), content_type="application/json")

    return web.get("/_sim/stats", stats)


def _add_route(hub: SimHub) -> web.RouteDef:
    async def add(request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        checkpoint = hub.add_checkpoint(payload["key"], payload.get("step"), loss=payload.get("loss"))
        return web.Response(body=orjson.dumps(checkpoint), content_type="application/json")

    return web.post("/_sim/checkpoint", add)


def _status_route(hub: SimHub) -> web.RouteDef:
    async def status(request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        hub.set_status(payload["key"], payload["status"], error=payload.get("error"))
        return web.Response(body=orjson.dumps(hub.fine_tune(payload["key"])), content_type="application/json")

    return web.post("/_sim/status", status)


def main() -> None:
    """Serve a simulated Hub in the foreground: `python -m watcher.simhub --fine-tunes 2000 --checkpoints 10`."""
    import argparse

    parser = argparse.ArgumentParser(description="A simulated Oxen Hub on 127.0.0.1 (for benchmarks).")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--fine-tunes", type=int, default=0, help="fine-tunes bench/ft_<n> in namespace bench")
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--samples", type=int, default=0, help="inference samples per checkpoint")
    parser.add_argument("--terminal", type=int, default=0, help="the first N fine-tunes completed an hour ago")
    args = parser.parse_args()
    hub = SimHub(token=args.token, port=args.port)
    now = time.time()
    for index in range(args.fine_tunes):
        if index < args.terminal:
            key = hub.add_fine_tune(
                "bench",
                "repo",
                f"ft_{index}",
                status="completed",
                created_at=now - 7200 + index,
                finished_at=now - 3600,
            )
        else:
            key = hub.add_fine_tune("bench", "repo", f"ft_{index}", created_at=now - 7200 + index)
        for step in range(1, args.checkpoints + 1):
            samples = [{"prompt": f"prompt {n}", "completion": "lorem ipsum " * 40} for n in range(args.samples)]
            hub.add_checkpoint(key, step * 100, loss=round(2.0 / step, 4), inference_samples=samples)
    app = hub.make_app()
    app.router.add_routes([_stats_route(hub), _add_route(hub), _status_route(hub)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(f"listening {sock.getsockname()[1]}", flush=True)
    web.run_app(app, sock=sock, access_log=None, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
