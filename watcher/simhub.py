"""A simulated Oxen Hub: the checkpoints endpoint exactly as the reference documents it, on 127.0.0.1.

A real HTTP server (aiohttp, in its own thread and event loop) with a thread-safe programmatic API to add
checkpoints, change deployment statuses and inject faults. Tests, `demo` and the benchmark use it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from .background import BackgroundServer

DEFAULT_TOKEN = "simhub-token"
PATH = "/api/repos/{namespace}/{repo}/fine_tunes/{id}/checkpoints"


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


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the simulated Hub received."""

    at: float
    key: str
    status: int
    authorized: bool


@dataclass
class _FineTune:
    namespace: str
    repo: str
    id: str
    name: str
    checkpoints: dict[int, dict[str, Any]] = field(default_factory=dict)
    faults: deque[Fault] = field(default_factory=deque)
    body: bytes | None = None  # cached serialized answer, dropped on every change


def _key(namespace: str, repo: str, fine_tune_id: str) -> str:
    return f"{namespace}/{repo}/{fine_tune_id}"


def _error_body(kind: str, title: str) -> bytes:
    return orjson.dumps({"error": {"type": kind, "title": title}, "status": "error", "status_message": kind})


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class SimHub:
    """The simulated Hub; use as a context manager or call start() and stop()."""

    def __init__(self, *, token: str | None = DEFAULT_TOKEN, host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
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
        return app

    # --- programmatic API --------------------------------------------------------------------------

    def add_fine_tune(self, namespace: str, repo: str, fine_tune_id: str, *, name: str | None = None) -> str:
        """Make a fine-tune exist (with no checkpoints yet); returns its key."""
        key = _key(namespace, repo, fine_tune_id)
        with self._lock:
            self._fine_tunes.setdefault(key, _FineTune(namespace, repo, fine_tune_id, name or fine_tune_id))
        return key

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
        """Queue faults for one fine-tune (or for every request when key is None), answered in order."""
        with self._lock:
            queue = self._global_faults if key is None else self._fine_tunes[key].faults
            queue.extend(faults)

    def clear_faults(self, key: str | None = None) -> None:
        """Drop queued faults of one fine-tune, or all faults when key is None."""
        with self._lock:
            if key is None:
                self._global_faults.clear()
                for fine_tune in self._fine_tunes.values():
                    fine_tune.faults.clear()
            else:
                self._fine_tunes[key].faults.clear()

    def requests(self, key: str | None = None) -> list[RequestRecord]:
        """The requests received so far (for one fine-tune when key is given)."""
        with self._lock:
            return [r for r in self._requests if key is None or r.key == key]

    def set_request_log(self, enabled: bool) -> None:
        """Turn request recording off for long benchmark runs."""
        self._record_requests = enabled

    # --- serving -------------------------------------------------------------------------------------

    def _next_fault(self, fine_tune: _FineTune | None) -> Fault | None:
        for queue in (self._global_faults, fine_tune.faults if fine_tune else None):
            if queue:
                fault = queue[0]
                if fault.times is not None:
                    if fault.times <= 1:
                        queue.popleft()
                    else:
                        queue[0] = Fault(**{**_fault_fields(fault), "times": fault.times - 1})
                return fault
        return None

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
            fine_tune = self._fine_tunes.get(key)
            fault = self._next_fault(fine_tune)
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
        for record in records:
            per_key.setdefault(record.key, []).append(record.at)
        return web.Response(
            body=orjson.dumps({"requests": len(records), "times": per_key}), content_type="application/json"
        )

    return web.get("/_sim/stats", stats)


def _add_route(hub: SimHub) -> web.RouteDef:
    async def add(request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        checkpoint = hub.add_checkpoint(payload["key"], payload.get("step"), loss=payload.get("loss"))
        return web.Response(body=orjson.dumps(checkpoint), content_type="application/json")

    return web.post("/_sim/checkpoint", add)


def main() -> None:
    """Serve a simulated Hub in the foreground: `python -m watcher.simhub --fine-tunes 2000 --checkpoints 10`."""
    import argparse

    parser = argparse.ArgumentParser(description="A simulated Oxen Hub on 127.0.0.1 (for benchmarks).")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--fine-tunes", type=int, default=0, help="fine-tunes bench/ft_<n> in namespace bench")
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--samples", type=int, default=0, help="inference samples per checkpoint")
    args = parser.parse_args()
    hub = SimHub(token=args.token, port=args.port)
    for index in range(args.fine_tunes):
        key = hub.add_fine_tune("bench", "repo", f"ft_{index}")
        for step in range(1, args.checkpoints + 1):
            samples = [{"prompt": f"prompt {n}", "completion": "lorem ipsum " * 40} for n in range(args.samples)]
            hub.add_checkpoint(key, step * 100, loss=round(2.0 / step, 4), inference_samples=samples)
    app = hub.make_app()
    app.router.add_routes([_stats_route(hub), _add_route(hub)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(f"listening {sock.getsockname()[1]}", flush=True)
    web.run_app(app, sock=sock, access_log=None, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
